"""A corpus of long source and text files from the installed packages, and its tokenizer.

    python -m experiments.code_corpus --output_dir runs/code/data --max_train_chars 400000000

Nothing is downloaded: every ``.py`` file (or every file with one of ``--extensions``, e.g.
``.py,.md,.rst,.txt``) under the interpreter's package directories (and the standard library)
is one document, ``{"text": source, "package": name}``.  Packages are
split between training and held-out sets by a seeded shuffle of their names, so no package
is in both (files of one package share identifiers; a split by file would leak them).
Identical files are kept once; files shorter than ``--min_chars`` are dropped.  A
SentencePiece BPE tokenizer (identity normalisation, whitespace kept, newline and tab as
single tokens, byte fallback) is trained on the training split only, unless
``--tokenizer none`` (a pretrained model brings its own).

Writes ``train.jsonl``, ``heldout.jsonl``, ``code_sp.model`` and ``corpus.json`` (packages of
each split, file and character counts).
"""
import argparse
import hashlib
import json
import os
import random
import sys
import sysconfig

import sentencepiece as spm

# Newline and tab as single tokens (SentencePiece would otherwise fold or drop them); runs of
# spaces need no symbol: with whitespace kept, BPE learns indentation merges itself.
WHITESPACE_SYMBOLS = ["\n", "\t"]


def package_roots():
    """Directories holding packages: site-packages of this interpreter and the stdlib."""
    paths = sysconfig.get_paths()
    roots = {paths["purelib"], paths["platlib"], paths["stdlib"]}
    return sorted(r for r in roots if r and os.path.isdir(r))


def package_of(root, path):
    """The top-level name under ``root`` (``stdlib`` for the standard library's own files)."""
    first = os.path.relpath(path, root).split(os.sep)[0]
    if root == sysconfig.get_paths()["stdlib"]:
        return "stdlib" if first != "site-packages" else None
    return os.path.splitext(first)[0]


def python_files(roots, min_chars, max_file_chars, extensions=(".py",)):
    """``{package: [(path, text)]}`` of readable, distinct files ending in ``extensions``."""
    seen, packages = set(), {}
    for root in roots:
        for directory, subdirs, files in os.walk(root):
            subdirs.sort()
            if directory == root:  # site-packages inside the stdlib tree is walked on its own
                subdirs[:] = [d for d in subdirs if d != "site-packages"]
            for name in sorted(files):
                if not name.endswith(tuple(extensions)):
                    continue
                path = os.path.join(directory, name)
                package = package_of(root, path)
                if package is None or package.endswith((".dist-info", ".egg-info")):
                    continue
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                if not min_chars <= len(text) <= max_file_chars:
                    continue
                digest = hashlib.sha1(text.encode()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                packages.setdefault(package, []).append((path, text))
    return packages


def split_packages(packages, heldout_fraction, seed):
    """``(train names, held-out names)``: packages in a seeded random order go to the held-out
    set until it holds ``heldout_fraction`` of the characters (skipping any that would
    overshoot by half, so one very large package cannot take it all)."""
    names = sorted(packages)
    random.Random(seed).shuffle(names)
    size = {name: sum(len(t) for _, t in packages[name]) for name in names}
    target = heldout_fraction * sum(size.values())
    heldout, chars = [], 0
    for name in names:
        if chars >= target:
            break
        if chars + size[name] <= 1.5 * target:
            heldout.append(name)
            chars += size[name]
    return sorted(set(names) - set(heldout)), sorted(heldout)


def write_split(path, packages, names, max_chars, seed):
    """Files of ``names`` in a seeded random order (training then sees packages mixed), up
    to ``max_chars`` characters; returns ``(files, characters)`` written."""
    files = [(name, text) for name in names for _, text in packages[name]]
    random.Random(seed).shuffle(files)
    count = chars = 0
    with open(path, "w") as f:
        for name, text in files:
            if chars >= max_chars:
                break
            f.write(json.dumps({"text": text, "package": name}) + "\n")
            count, chars = count + 1, chars + len(text)
    return count, chars


def train_tokenizer(train_path, model_prefix, vocab_size, sample_chars, threads,
                    character_coverage=1.0):
    """SentencePiece BPE on the first ``sample_chars`` characters of the training split
    (characters outside ``character_coverage`` are spelled in bytes)."""
    def lines():
        used = 0
        with open(train_path) as f:
            for line in f:
                for source_line in json.loads(line)["text"].split("\n"):
                    if source_line.strip():
                        used += len(source_line)
                        yield source_line
                if used >= sample_chars:
                    return

    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=WHITESPACE_SYMBOLS,
        character_coverage=character_coverage, num_threads=threads, max_sentence_length=8192,
        train_extremely_large_corpus=False, minloglevel=2)
    os.remove(model_prefix + ".vocab")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--roots", default=None,
                        help="comma list of package directories (default: this interpreter's)")
    parser.add_argument("--max_train_chars", type=int, default=400_000_000)
    parser.add_argument("--max_heldout_chars", type=int, default=40_000_000)
    parser.add_argument("--heldout_fraction", type=float, default=0.1,
                        help="share of all characters in held-out packages")
    parser.add_argument("--extensions", default=".py",
                        help="comma list of file name endings that make documents")
    parser.add_argument("--tokenizer", default="sentencepiece",
                        choices=("sentencepiece", "none"),
                        help="train code_sp.model on the training split, or not (none: the "
                             "model brings its own tokenizer)")
    parser.add_argument("--min_chars", type=int, default=2000)
    parser.add_argument("--max_file_chars", type=int, default=1_000_000,
                        help="skip larger files (generated tables, vendored bundles)")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--character_coverage", type=float, default=1.0,
                        help="share of characters that get their own piece (the rest are "
                             "spelled in bytes); below 1 when the vocabulary is too small for "
                             "every character of the sample")
    parser.add_argument("--tokenizer_sample_chars", type=int, default=30_000_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    roots = args.roots.split(",") if args.roots else package_roots()
    extensions = tuple(e.strip() for e in args.extensions.split(",") if e.strip())
    packages = python_files(roots, args.min_chars, args.max_file_chars, extensions)
    if len(packages) < 2:
        sys.exit(f"found {len(packages)} package(s) with {','.join(extensions)} files under "
                 f"{roots}: need 2+")
    train_names, heldout_names = split_packages(packages, args.heldout_fraction, args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    train_path = os.path.join(args.output_dir, "train.jsonl")
    train_files, train_chars = write_split(train_path, packages, train_names,
                                           args.max_train_chars, args.seed)
    heldout_files, heldout_chars = write_split(os.path.join(args.output_dir, "heldout.jsonl"),
                                               packages, heldout_names, args.max_heldout_chars,
                                               args.seed)
    if args.tokenizer == "sentencepiece":
        train_tokenizer(train_path, os.path.join(args.output_dir, "code_sp"), args.vocab_size,
                        args.tokenizer_sample_chars, args.threads, args.character_coverage)
    summary = dict(roots=roots, train_packages=train_names, heldout_packages=heldout_names,
                   train_files=train_files, train_chars=train_chars,
                   heldout_files=heldout_files, heldout_chars=heldout_chars,
                   extensions=list(extensions), python=sys.version.split()[0],
                   vocab_size=args.vocab_size if args.tokenizer == "sentencepiece" else None)
    with open(os.path.join(args.output_dir, "corpus.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"train: {train_files} files, {train_chars / 1e6:.1f}M chars, "
          f"{len(train_names)} packages; held out: {heldout_files} files, "
          f"{heldout_chars / 1e6:.1f}M chars, {len(heldout_names)} packages")


if __name__ == "__main__":
    main()

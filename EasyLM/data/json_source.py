"""JSON-lines files (a path, comma list, glob or directory; local or an fsspec URL) as a source
of records, read in order, forever."""
import fsspec

from EasyLM.config import ConfigError, Option
from EasyLM.data.dataset import common_config, _DocumentDataset


def _resolve_files(path, key):
    """``(filesystem, path, shown name)`` of every file a path, comma list, glob or directory
    names, local or fsspec URL, in a fixed order."""
    if not path:
        raise ConfigError(f"{key} is empty; give a JSON-lines file, comma list, glob or directory")
    files = []
    for part in (p.strip() for p in path.split(",")):
        fs, fs_path = fsspec.core.url_to_fs(part)
        if any(char in part for char in "*?["):
            matches = sorted(fs.glob(fs_path))
        elif fs.isdir(fs_path):
            matches = sorted(f for f in fs.find(fs_path)
                             if f.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")))
        elif fs.exists(fs_path):
            matches = [fs_path]
        else:
            raise ConfigError(f"{key}: {part} does not exist")
        if not matches:
            raise ConfigError(f"{key}: {part} matches no JSON-lines file")
        files += [(fs, match, _as_given(part, fs_path, match, fs)) for match in matches]
    return files


def _fixed_part(path):
    """``path`` up to the last '/' before its first glob character; all of it (without a
    trailing '/') when it has none."""
    magic = [i for i in map(path.find, "*?[") if i >= 0]
    return path[:path.rfind("/", 0, min(magic)) + 1] if magic else path.rstrip("/")


def _as_given(part, fs_path, match, fs):
    """The name of ``match``, a file that ``part`` of the path names (``fs_path`` is
    ``part`` as fsspec spells it), in the user's spelling: a relative path stays relative and
    its ``..`` stays, so a message shows the path the user wrote."""
    root, given = _fixed_part(fs_path), _fixed_part(part)
    return given + match[len(root):] if match.startswith(root) else fs.unstrip_protocol(match)


class JsonDataset(_DocumentDataset):
    """JSON lines (one example per line) from files read in order, forever."""

    @staticmethod
    def get_default_config(updates=None):
        config = common_config(
            path=Option("", "JSON-lines file, comma list, glob or directory; local or "
                        "fsspec URL"),
            start_seek_loc=Option(0, "byte offset to start at in the first file"),
            example_index_at_start=Option(0, "added to the dataset_example_index metric"),
            tokens_count_at_start=Option(0, "added to the dataset_total_tokens metric"),
        )
        return config.copy_and_update(updates)

    def __init__(self, config, tokenizer, text_processor, process_index=0, process_count=1,
                 name="json_dataset", pipeline_spec=None):
        super().__init__(self.get_default_config(config), tokenizer, text_processor,
                         process_index, process_count, name, pipeline_spec)
        self._files = _resolve_files(self.config.path, f"{name}.path")
        self._check_data()

    def _parts(self):
        # Every file: one that is empty or broken would otherwise be found only when read.
        return ((self._file_records(0, file_index), shown)
                for file_index, (_, _, shown) in enumerate(self._files))

    def _initial_position(self):
        offset = self.config.start_seek_loc
        line = 0
        if offset:
            fs, path, _ = self._files[0]
            with fs.open(path, "rb", compression="infer") as f:
                line = f.read(offset).count(b"\n")
        return {"pass": 0, "file_index": 0, "file_loc": offset, "line": line}

    def _records(self, position):
        pass_, file_index = position["pass"], position["file_index"]
        offset, line = position["file_loc"], position["line"]
        if file_index >= len(self._files):
            raise ValueError(f"{self.prefix}: the saved position is in file {file_index} but "
                             f"{self.config.path} now names only {len(self._files)} file(s)")
        while True:
            from_start, read_any = file_index == 0 and offset == 0, False
            for file_index in range(file_index, len(self._files)):
                for record in self._file_records(pass_, file_index, offset, line):
                    read_any = True
                    yield record
                offset = line = 0
            if from_start and not read_any:
                raise ValueError(f"{self.prefix}.path: {self.config.path} holds no lines")
            pass_, file_index = pass_ + 1, 0

    def _file_records(self, pass_, file_index, offset=0, line=0):
        """The records of the non-blank lines of one file, from byte ``offset`` (just after
        line ``line``) to its end."""
        fs, path, shown = self._files[file_index]
        with fs.open(path, "rb", compression="infer") as f:
            f.seek(offset)
            for raw in iter(f.readline, b""):
                offset += len(raw)
                line += 1
                if raw.strip():
                    yield ({"pass": pass_, "file_index": file_index, "file_loc": offset,
                            "line": line}, f"{shown}:{line}", raw.rstrip(b"\r\n"))

"""How the FoT model cuts its input into windows; shared by the PyTorch model and the JAX
inference (:mod:`EasyLM.models.llama.windowed_lm`), so both consume tokens the same way.
Plain Python: this file is copied into exported model directories.

Two rules (``window_rule`` in the exported config):

``"aligned"`` (the default)
    A token's local window starts at the last multiple of ``W`` tokens of its stream: token
    ``t`` sees tokens ``W * (t // W) .. t`` locally and every earlier token through the memory.
    This is exactly how training shows windows to the model (row ``k`` of a document is tokens
    ``kW .. kW + W - 1``, earlier rows are memory), and it is causal: a token's output depends
    only on the tokens before it, never on how many follow or on how the input was split into
    calls (whole, in chunks, token by token, or right-padded in a batch).  When the local
    window is full and a token arrives, the whole window moves to memory.

``"longllama"``
    The original LongLLaMA code's rule: a prompt's last ``W`` tokens form its final window
    (the tokens before them are processed in windows of ``local_limit`` tokens from the start,
    the original's ``max_position_embeddings``, each moved whole to memory), and later tokens
    join the local window until it would exceed ``local_limit`` tokens, when the whole window
    moves to memory.
    Outputs then depend on the prompt's length; models published with this rule keep it.

Under both rules eviction moves the *whole* local window, so a token keeps its local position
for as long as it stays local.
"""

RULES = ("aligned", "longllama")


def check_rule(rule):
    if rule not in RULES:
        raise ValueError(f"window_rule must be one of {RULES}, got {rule!r}")


def local_capacity(window, rule="aligned", local_limit=None):
    """Most tokens a local window holds under ``rule``."""
    check_rule(rule)
    if rule == "longllama":
        return max(window, local_limit or window)
    return window


def plan_windows(local_length, num_tokens, window, rule="aligned", local_limit=None):
    """``[(start, end, evict)]`` for consuming ``num_tokens`` new tokens.

    ``local_length`` tokens already sit in the local window.  Each piece ``[start, end)`` of
    the input is processed in one step; before it, the ``evict`` oldest local tokens (always
    the whole window, or none) leave the window into memory (for memory layers).
    """
    check_rule(rule)
    pieces = []
    if rule == "aligned":
        start = 0
        while start < num_tokens:
            evict = local_length if local_length >= window else 0
            local_length -= evict
            end = min(num_tokens, start + window - local_length)
            pieces.append((start, end, evict))
            local_length += end - start
            start = end
        return pieces
    limit = local_capacity(window, rule, local_limit)
    fresh = local_length == 0
    cut = max(num_tokens - window, 0)
    bounds = list(range(0, cut, limit)) + [cut, num_tokens]
    if bounds[0] != 0:
        bounds.insert(0, 0)
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        # A fresh prompt's windows before the last go to memory whole (the original runs
        # them without a local cache); afterwards a window empties only when it would
        # overflow.
        if (fresh and pieces) or local_length + end - start > limit:
            evict = local_length
        else:
            evict = 0
        pieces.append((start, end, evict))
        local_length += end - start - evict
    return pieces

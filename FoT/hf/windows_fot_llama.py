"""How the FoT model cuts its input into windows; shared by the PyTorch model and the JAX
inference (:mod:`EasyLM.models.llama.windowed_lm`), so both consume tokens the same way.
Plain Python: this file is copied into exported model directories.
"""


def plan_windows(local_length, num_tokens, window):
    """``[(start, end, evict)]`` for consuming ``num_tokens`` new tokens.

    ``local_length`` tokens already sit in the local window (at most ``window``).  The input
    is cut into pieces of ``window`` tokens from its start; before a piece is processed, its
    oldest ``evict`` local tokens leave the window (into memory, for memory layers) so that
    the window plus the piece fit in ``window`` tokens.  From an empty state this gives
    windows ``[0, W), [W, 2W), ...`` whose last, partial window keeps the end of the previous
    one as local context; one token at a time (generation) it slides the local window.
    Feeding an input in chunks of ``window`` tokens gives the same pieces as feeding it whole.
    """
    pieces = []
    for start in range(0, num_tokens, window):
        end = min(start + window, num_tokens)
        evict = max(0, local_length + end - start - window)
        pieces.append((start, end, evict))
        local_length += end - start - evict
    return pieces

"""The report of the records a source skipped: logged as they are read, counted per reason."""
import collections
import logging

logger = logging.getLogger(__name__)


class SkipReport:
    """Skipped lines of the first pass, reported as they are read and counted per reason.

    Each of the first ``LINES_PER_FILE`` skipped lines of a file is logged (INFO, with the
    run's progress lines) when it is read, its location spelt as the path was given; the
    later ones are only counted.  Every ``REPORT_LINES`` lines read and at the end of the
    first pass come the warnings: one per reason, with its count and first locations.  The
    report lives in the main process (tokenizer processes return reasons, not messages), so
    each line is reported once; it is not part of the saved state, so after a restore the
    lines read from there on are reported afresh."""

    LOCATIONS = 3
    LINES_PER_FILE = 3
    # Also report after this many lines, so a long first pass is reported as it goes.
    REPORT_LINES = 100_000

    def __init__(self, name):
        self.name = name
        self.lines = 0  # read since the last report
        self._reasons = {}  # reason -> [count, first locations]
        self._shown = collections.Counter()  # file -> its skipped lines logged when read

    def read(self, where, reason=None, file=None):
        """One line of ``file`` (any key naming it) read, skipped for ``reason`` unless it
        is None."""
        self.lines += 1
        if reason is not None:
            self._show(where, reason, file)
            entry = self._reasons.setdefault(reason, [0, []])
            entry[0] += 1
            if len(entry[1]) < self.LOCATIONS:
                entry[1].append(where)
        if self.lines >= self.REPORT_LINES:
            self.warn()

    def _show(self, where, reason, file):
        self._shown[file] += 1
        shown = self._shown[file]
        if shown <= self.LINES_PER_FILE:
            last = ("" if shown < self.LINES_PER_FILE else
                    "; further skipped lines of this file are only counted, in the warnings "
                    f"every {self.REPORT_LINES} lines and at the end of the first pass")
            logger.info("%s: skipped %s: %s%s", self.name, where, reason, last)

    def warn(self):
        """One warning per reason seen since the last report."""
        for reason, (count, locations) in self._reasons.items():
            more = ", ..." if count > len(locations) else ""
            logger.warning("%s: %d of %d lines skipped, %s: %s%s", self.name, count, self.lines,
                           reason, ", ".join(locations), more)
        self.lines, self._reasons = 0, {}

"""The README's Python examples run as written (in order, sharing one namespace)."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_blocks_run(capsys):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    lines = capsys.readouterr().out.splitlines()
    # The adaptation example: the log-likelihood it prints rose from -20.4 and greedy output now
    # begins with the rewarded response.
    # (the streamed text before it ends without a newline, so the number ends a line)
    ll_line = max(i for i, line in enumerate(lines) if re.search(r"-\d+\.\d+$", line))
    assert float(re.search(r"-\d+\.\d+$", lines[ll_line]).group()) > -15.0
    assert lines[ll_line + 1].startswith("Good morrow, cousin.")

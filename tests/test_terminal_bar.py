"""The CLI's progress bars (tqdm): one line per stage, with its count and message."""

from __future__ import annotations

import io

from napari_wbc.progress import Progress, TerminalBar, run


def _events():
    yield Progress("scale", 0, 0, "measuring red cells")
    for i in range(1, 4):
        yield Progress("blocks", i, 3, f"{i * 5} cells {{so far}}")
    return "done"


def test_each_stage_gets_a_line_with_its_count_and_message():
    stream = io.StringIO()
    bar = TerminalBar(stream, min_interval=0)
    assert run(_events(), bar) == "done"
    bar.close()
    text = stream.getvalue()
    lines = [line.split("\r")[-1] for line in text.split("\n") if line.strip()]
    assert len(lines) == 2, text
    assert lines[0].strip().startswith("scale") and "measuring red cells" in lines[0]
    assert "blocks" in lines[1] and "3/3" in lines[1] and "15 cells {so far}" in lines[1]


def test_events_closer_than_the_interval_are_not_drawn_but_the_last_is():
    stream = io.StringIO()
    bar = TerminalBar(stream, min_interval=60)
    for i in range(1, 101):
        bar(Progress("tiles", i, 100, ""))
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") < 5
    assert "100/100" in text.rstrip("\n").split("\r")[-1]

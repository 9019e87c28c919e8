"""What the testbed shows: the rich live table on a terminal, the plain table elsewhere."""

import io

from rich.console import Console

from gossipfl.learning.learner import build_seeded, gossiped_tensors
from gossipfl.learning.registry import get_task
from gossipfl.protocol import wire
from gossipfl.testbed.observe import Display, live_view, render, sample
from gossipfl.testbed.options import WatchedNode, free_ports

from .helpers import running


def watched() -> list[WatchedNode]:
    """Three nodes as the testbed last saw them; the third did not answer the latest sample."""
    return [
        WatchedNode(0, "node0-ab12", last_status={
            "age": 120, "peers": [{}, {}], "metrics": {"accuracy": 0.91234, "loss": 0.3456},
            "exchanges": {"ok": 17, "failed": 2, "busy": 3}, "upload": {"rate_bytes_per_s": 15300.0},
        }),
        # no accuracy yet, and no "upload" in its status
        WatchedNode(1, "node1-ab12", last_status={
            "age": 7, "peers": [{}], "metrics": {"accuracy": None, "loss": None}, "exchanges": {"ok": 0},
        }),
        WatchedNode(2, "node2-ab12", last_status={
            "age": 50, "peers": [], "metrics": {"accuracy": 0.5, "loss": 1.0}, "exchanges": {"ok": 4},
        }),
    ]  # fmt: skip


ROW = {
    "t": 12.345,
    "consensus_distance": 0.01234,
    "mean_norm": 2.0,
    "accuracy_mean": 0.9,
    "accuracy_min": 0.85,
    "unreachable": ["node2-ab12"],
}


def rich_text(nodes: list[WatchedNode], row: dict) -> list[str]:
    console = Console(file=io.StringIO(), width=120)
    console.print(live_view(nodes, row, 60))
    return console.file.getvalue().splitlines()


def line_of(lines: list[str], node_id: str) -> list[str]:
    (line,) = [x for x in lines if x.startswith(node_id)]
    return line.split()


def test_the_rich_table_shows_each_node_and_marks_the_one_that_did_not_answer():
    lines = rich_text(watched(), ROW)
    assert lines[:2] == [
        "t= 12.3/60 s   consensus distance 1.234e-02 (0.62% of the mean model's norm)",
        "accuracy mean 0.9000  min 0.8500",
    ]
    assert lines[2].split() == ["node", "accuracy", "loss", "age", "peers", "ok", "fail", "busy", "upload"]
    assert line_of(lines, "node0-ab12") == ["node0-ab12", "0.9123", "0.346", "120", "2", "17", "2", "3", "15.3", "kB/s"]
    assert line_of(lines, "node1-ab12") == ["node1-ab12", "-", "-", "7", "1", "0", "0", "0", "-"]
    assert line_of(lines, "node2-ab12") == ["node2-ab12", "unreachable"]  # not its stale accuracy
    assert lines[-1].strip() == "1 of 3 nodes unreachable in this sample"


def test_the_rich_table_before_any_consensus_distance_and_with_everyone_answering():
    row = {"t": 0.0, "consensus_distance": None, "mean_norm": None, "accuracy_mean": None, "unreachable": []}
    lines = rich_text(watched(), row)
    assert lines[0].strip() == "t=  0.0/60 s"
    assert line_of(lines, "node2-ab12")[:3] == ["node2-ab12", "0.5000", "1.000"]
    assert not any("unreachable" in x for x in lines)


def test_the_plain_table_is_as_before():
    assert render(watched(), ROW, 60).splitlines() == [
        "t= 12.3/60s  consensus distance=1.234e-02",
        "node             accuracy    loss    age peers    ok fail busy",
        "node0-ab12         0.9123   0.346    120     2    17    2    3",
        "node1-ab12              -       -      7     1     0    0    0",
        "node2-ab12         0.5000   1.000     50     0     4    0    0",
    ]


def test_off_a_terminal_the_plain_table_is_printed_every_5_s(capsys):
    with Display(60, live=True, tty=False) as display:
        for t in range(12):
            display.show(watched(), {**ROW, "t": float(t)})
    out = capsys.readouterr().out
    assert out.count("node             accuracy") == 3
    assert [x for x in out.splitlines() if x.startswith("t=")] == [
        f"t={t:5.1f}/60s  consensus distance=1.234e-02" for t in (0, 5, 10)
    ]
    assert "\x1b" not in out  # no terminal codes in a pipe
    with Display(60, live=False, tty=False) as display:  # --quiet
        display.show(watched(), ROW)
    assert capsys.readouterr().out == ""


def test_on_a_terminal_the_live_table_is_redrawn_in_place():
    console = Console(file=io.StringIO(), width=120, force_terminal=True, color_system=None)
    with Display(60, live=True, tty=True, console=console) as display:
        for t in (0.0, 1.0, 2.0):
            display.show(watched(), {**ROW, "t": t})
    out = console.file.getvalue()
    for t in (0.0, 1.0, 2.0):
        assert f"t={t:5.1f}/60 s" in out
    assert "\x1b[2J" not in out and "\x1b[H" not in out  # no clearing the screen (the old flicker)
    assert "\x1b[1A\x1b[2K" in out  # the previous table is overwritten line by line
    last = out.rsplit("\x1b[2K", 1)[1]  # after the last erase: the last table, left on screen at the end
    assert last.startswith("t=  2.0/60 s") and "1 of 3 nodes unreachable in this sample" in last


async def test_a_sample_names_the_nodes_that_did_not_answer(make_config, http):
    model = build_seeded(get_task("digits").build_model, 0)
    spec = wire.spec_of({k: v.detach().numpy() for k, v in gossiped_tensors(model).items()})
    async with running(make_config(id="seen")) as (node,):
        nodes = [
            WatchedNode(0, "seen", url=node.url),
            WatchedNode(1, "gone", url=f"http://127.0.0.1:{free_ports(1)[0]}"),
        ]
        row, mean = await sample(http, nodes, spec, 1.0)
    assert row["unreachable"] == ["gone"] and row["nodes_sampled"] == 1 and mean is not None
    lines = rich_text(nodes, row)
    assert line_of(lines, "gone") == ["gone", "unreachable"]
    assert line_of(lines, "seen")[3:5] == [str(nodes[0].last_status["age"]), "0"]  # its own status, no peers

"""What the testbed shows: the rich live table on a terminal, the plain table elsewhere, and
convergence.png at the end of a run."""

import io
import json
import subprocess
import sys

import pytest
from rich.console import Console

from gossipfl.learning.learner import build_seeded, gossiped_tensors
from gossipfl.learning.registry import get_task
from gossipfl.protocol import wire
from gossipfl.testbed.observe import Display, live_view, render, sample
from gossipfl.testbed.options import WatchedNode, free_ports
from gossipfl.testbed.plot import SKIPPED, convergence_figure, plot_convergence

from .helpers import running

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def results(nodes: int = 3, norm: float | None = 2.0) -> dict:
    """A results dict as report.summarize gives it: accuracy rising, the distance falling, one gap."""
    ts = [0.0, 1.0, 2.0, 3.0]
    return {
        "mode": "inproc",
        "options": {"task": "digits"},
        "nodes": {
            f"n{i}": {"accuracy": [(t, None if (i, t) == (0, 0.0) else 0.2 * t + 0.1 * i) for t in ts]}
            for i in range(nodes)
        },
        "consensus": [
            {"t": t, "consensus_distance": cd, "mean_norm": norm}
            for t, cd in zip(ts, [None, 0.4, 0.2, 0.1], strict=True)
        ],
    }


def test_the_figure_draws_every_node_their_mean_and_the_relative_distance_on_a_log_scale():
    acc, cd = convergence_figure(results()).axes
    lines = acc.get_lines()
    assert [x.get_label() for x in lines] == ["n0", "n1", "n2", "mean"]
    assert list(lines[0].get_xdata()) == [1.0, 2.0, 3.0]  # the sample without an accuracy is left out
    assert lines[-1].get_linewidth() > 2 * lines[0].get_linewidth()  # the mean bold, the nodes thin
    assert list(lines[-1].get_xdata()) == [0.0, 1.0, 2.0, 3.0]
    assert lines[-1].get_ydata() == pytest.approx([0.15, 0.3, 0.5, 0.7])  # at t=0 only n1 and n2
    (distance,) = cd.get_lines()
    assert list(distance.get_xdata()) == [1.0, 2.0, 3.0]
    assert distance.get_ydata() == pytest.approx([0.2, 0.1, 0.05])  # over the mean model's norm
    assert cd.get_yscale() == "log" and "norm" in cd.get_ylabel()


def test_without_the_norm_the_distance_is_absolute_and_without_positive_values_linear():
    _, cd = convergence_figure(results(norm=None)).axes
    assert cd.get_lines()[0].get_ydata() == pytest.approx([0.4, 0.2, 0.1]) and cd.get_yscale() == "log"
    flat = results()
    for row in flat["consensus"][1:]:
        row["consensus_distance"] = 0.0
    _, cd = convergence_figure(flat).axes
    assert cd.get_yscale() == "linear"
    many = convergence_figure(results(nodes=12)).axes[0]  # beyond ten nodes only the mean is named
    assert [t.get_text() for t in many.get_legend().get_texts()] == ["mean"]


def test_the_png_is_written_and_reads_back_at_its_size(tmp_path):
    from matplotlib.image import imread

    path = plot_convergence(results(), tmp_path / "convergence.png")
    assert path == tmp_path / "convergence.png" and path.read_bytes()[:8] == PNG_MAGIC
    assert imread(path).shape == (400, 1100, 4)


def test_without_matplotlib_no_png_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what a missing package raises: ImportError
    assert plot_convergence(results(), tmp_path / "convergence.png") is None
    assert list(tmp_path.iterdir()) == []


def gossipfl_testbed(*args: str, block_matplotlib: bool = False) -> subprocess.CompletedProcess:
    code = "import sys; from gossipfl.cli import main; sys.exit(main(sys.argv[1:]))"
    if block_matplotlib:
        code = "import sys; sys.modules['matplotlib'] = None; " + code
    return subprocess.run([sys.executable, "-c", code, "testbed", *args], capture_output=True, text=True, timeout=90)


@pytest.mark.timeout(120)
def test_a_run_writes_convergence_png_next_to_results_json(tmp_path):
    out = tmp_path / "tb"
    r = gossipfl_testbed("--mode", "inproc", "--nodes", "2", "--duration", "3", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-2:] == [
        f"testbed: results in {out / 'results.json'}",
        f"testbed: convergence plot in {out / 'convergence.png'}",
    ]
    assert (out / "convergence.png").read_bytes()[:8] == PNG_MAGIC
    assert "node             accuracy    loss    age peers    ok fail busy" in lines  # a pipe: the plain table
    assert all(
        "unreachable" in row and row["unreachable"] == []
        for row in json.loads((out / "results.json").read_text())["consensus"]
    )


@pytest.mark.timeout(120)
def test_a_run_without_matplotlib_says_how_to_get_the_plot_and_succeeds(tmp_path):
    out = tmp_path / "tb"
    r = gossipfl_testbed(
        "--mode", "inproc", "--nodes", "1", "--duration", "1", "--out", str(out), block_matplotlib=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == SKIPPED and "pip install 'gossipfl[plot]'" in SKIPPED
    assert (out / "results.json").exists() and not (out / "convergence.png").exists()

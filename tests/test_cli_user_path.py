"""The command line as a user meets it: argument order, what a selection means, where Tiled is, and
the commands that show what is in Tiled (``show``, ``runs``, ``models``) on a real server."""

import json
import shlex
import time
import uuid

import pytest
from test_runs_training import fly  # noqa: F401 (a fixture)

from bluesky_ptychonn.archive.registry import register_model
from bluesky_ptychonn.cli import build_parser, main
from bluesky_ptychonn.live.sink import TiledSink


@pytest.mark.parametrize(
    "argv, expected",
    [
        # argparse alone failed these with "unrecognized arguments": a `*` positional after an option.
        (
            "fine-tune model.safetensors --newest 2 sample_id=x --labels iterative",
            {"checkpoint": "model.safetensors", "runs": ["sample_id=x"], "newest": 2},
        ),
        ("replay --checkpoint m.safetensors abcdef sample_id=y", {"runs": ["abcdef", "sample_id=y"]}),
        ("iterative --epochs 3 abcdef", {"runs": ["abcdef"], "epochs": 3}),
        ("train-runs --labels truth sample_id=z --out m.safetensors --network small", {"runs": ["sample_id=z"]}),
        ("refine --seed flat abcdef --epochs 5 ghijkl", {"runs": ["abcdef", "ghijkl"], "seed_source": "flat"}),
    ],
)
def test_positionals_and_options_in_any_order(argv, expected):
    args = build_parser().parse_args(argv.split())
    assert {k: getattr(args, k) for k in expected} == expected


def test_every_option_has_help_and_every_command_examples_that_parse():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        assert command.epilog and command.epilog.startswith("examples:\n"), name
        for line in command.epilog.splitlines()[1:]:
            words = shlex.split(line.split(" #")[0])
            while "=" in words[0]:  # environment assignments
                words.pop(0)
            assert words[:2] == ["bluesky-ptychonn", name], line
            assert parser.parse_args(words[1:]).func, line


def _key(tiled_server, monkeypatch):
    monkeypatch.setenv("TEST_TILED_KEY", tiled_server.server.api_key)
    return ["--api-key-env", "TEST_TILED_KEY"]


def _uri(tiled_server):
    return tiled_server.server.uri.split("?")[0]


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_selection_uids_and_conditions(tiled_server, fly, monkeypatch, capsys):  # noqa: F811
    tag, other = uuid.uuid4().hex, uuid.uuid4().hex
    a, b = fly(tag, shape=(2, 3)), fly(tag, shape=(2, 3))
    c = fly(other, shape=(2, 3))
    common = ["--checkpoint", "unused.safetensors", "--tiled-uri", _uri(tiled_server), *_key(tiled_server, monkeypatch)]

    def selected(*argv):
        assert main(["replay", *argv, *common, "--dry-run"]) == 0
        return {row["uid"] for row in _json(capsys)}

    assert selected(f"start.campaign={tag}") == {a, b}  # conditions alone: every run meeting them
    assert selected(a, c) == {a, c}  # several uids: any of them
    assert selected(a, f"start.campaign={tag}") == {a}  # uids and conditions: the named runs, checked
    assert selected(f"start.campaign={tag}", "--plan-name", "ptycho_fly_scan") == {a, b}  # conditions: all hold
    # A named run that misses a condition is an error naming it, never silently dropped or added.
    assert main(["replay", a, c, f"start.campaign={tag}", *common, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert c[:8] in err and "do not meet" in err
    assert main(["replay", "start.campaign=no-such-campaign", *common, "--dry-run"]) == 2
    assert "matches no run" in capsys.readouterr().err


def test_tiled_location_from_uri_environment_and_profile(tiled_server, fly, tmp_path, monkeypatch, capsys):  # noqa: F811
    import tiled.profiles

    tag = uuid.uuid4().hex
    uid = fly(tag, shape=(2, 3))
    key = _key(tiled_server, monkeypatch)
    for name in ("TILED_URI", "TILED_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tiled.profiles, "paths", [tmp_path / "profiles"])
    tiled.profiles.load_profiles.cache_clear()
    try:
        assert main(["runs", f"start.campaign={tag}", "--json", *key]) == 2
        assert "--tiled-uri" in capsys.readouterr().err and "TILED_URI" not in " ".join(key)
        monkeypatch.setenv("TILED_URI", _uri(tiled_server))
        assert main(["runs", f"start.campaign={tag}", "--json", *key]) == 0
        assert [row["uid"] for row in _json(capsys)] == [uid]
        monkeypatch.delenv("TILED_URI")
        (tmp_path / "profiles").mkdir()
        (tmp_path / "profiles" / "beamline.yml").write_text(f"beamline:\n  uri: {_uri(tiled_server)}\n")
        tiled.profiles.load_profiles.cache_clear()
        assert main(["runs", f"start.campaign={tag}", "--json", "--profile", "beamline", *key]) == 0
        assert [row["uid"] for row in _json(capsys)] == [uid]
        monkeypatch.setenv("TILED_PROFILE", "beamline")
        assert main(["runs", uid, "--json", *key]) == 0
        assert [row["uid"] for row in _json(capsys)] == [uid]
        assert main(["runs", uid, "--json", "--profile", "nowhere", *key]) == 2
        assert "nowhere" in capsys.readouterr().err
    finally:
        tiled.profiles.load_profiles.cache_clear()


def test_show_runs_and_models(tiled_server, fly, checkpoint, tmp_path, monkeypatch, capsys):  # noqa: F811
    tag = uuid.uuid4().hex
    done, stale, bare = fly(tag, shape=(3, 4)), fly(tag, shape=(2, 3)), fly(tag, shape=(2, 3))
    common = ["--tiled-uri", _uri(tiled_server), *_key(tiled_server, monkeypatch)]
    assert main(["replay", done, "--checkpoint", str(checkpoint), "--device", "cpu", *common]) == 0
    capsys.readouterr()
    # A live result left running by a consumer that died an hour ago.
    TiledSink(tiled_server.client, stale).write_metadata({"status": "running", "updated": time.time() - 3600})
    # ... and a refinement of another run whose process was killed.
    TiledSink(tiled_server.client, done, "refined").write_metadata({"status": "running", "updated": time.time() - 3600})

    assert main(["show", done[:8], "--out", str(tmp_path / "done.png"), *common]) == 0
    shown = _json(capsys)
    assert shown["results"] == {"ptychonn": "complete", "refined": "running"} and shown["run"] == done
    assert (tmp_path / "done.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", bare, *common]) == 2
    assert "no ptychonn or refined or iterative result" in capsys.readouterr().err

    assert main(["runs", f"start.campaign={tag}", "--json", *common]) == 0
    rows = {row["uid"]: row for row in _json(capsys)}
    assert rows[done]["ptychonn"] == "complete" and rows[done]["frames_done"] == 12
    assert rows[done]["refined"] == "running" and rows[done]["stale"] == ["refined"]
    assert rows[done]["model"] and rows[done]["points"] == 12 and rows[done]["exit"] == "success"
    assert rows[stale]["stale"] == ["ptychonn"] and "ptychonn" not in rows[bare] and not rows[bare]["stale"]
    assert main(["runs", "--json", "--limit", "2", *common]) == 0  # no selection: the newest, oldest first
    assert [row["uid"] for row in _json(capsys)] == [stale, bare]
    assert main(["runs", f"start.campaign={tag}", "--stale", *common]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["uid", "started", "age"] and len(table) == 3
    assert table[1].startswith(done[:8]) and "complete" in table[1] and "running STALE" in table[1]
    assert table[2].startswith(stale[:8]) and "running STALE" in table[2]

    path = register_model(tiled_server.client, checkpoint)
    assert main(["models", "--json", *common]) == 0
    models = {row["hash"]: row for row in _json(capsys)}
    assert path.split("/")[1] in models and models[path.split("/")[1]]["file"] == checkpoint.name
    assert main(["models", *common]) == 0
    assert path.split("/")[1][:12] in capsys.readouterr().out


def test_live_view_follows_the_run_in_memory_and_through_tiled(
    tiled_server, make_devices, checkpoint, tmp_path, caplog
):
    """The IPython live figure: documents pick the run, a timer redraws; the final image ends it.

    The run also logs one INFO line as it starts and one as it ends.
    """
    import logging

    import numpy as np
    from bluesky import RunEngine
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from test_replay import FAST, STEP_M

    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.servers import subscribe_archive
    from bluesky_ptychonn.live.callback import PtychoNNCallback
    from bluesky_ptychonn.live.sink import read_image
    from bluesky_ptychonn.live.view import LiveImageView

    def figure():
        fig = Figure()
        FigureCanvasAgg(fig)
        return fig

    run_engine = RunEngine({})
    callback = PtychoNNCallback.from_checkpoint(
        checkpoint,
        tiled_server.client,
        device="cpu",
        data_roots=[tiled_server.data_dir],
        live=FAST,
    )
    caplog.set_level(logging.INFO, logger="bluesky_ptychonn")
    view = LiveImageView(callback, figure=figure(), interval_s=0.2)
    run_engine.subscribe(callback)
    subscribe_archive(run_engine, tiled_server.client)
    run_engine.subscribe(view)
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(4, 6), exposure_s=2e-3))
    assert view.uid == uid and view._timer is not None  # the redraws run on the figure's own timer
    assert callback.wait(uid, 60)
    assert view.update()  # the final image: the timer may stop
    image = callback.runs[uid].live.snapshot()
    drawn = np.ma.filled(view._images["phase"].get_array(), np.nan)
    np.testing.assert_allclose(drawn, np.where(image.weight > 0, image.phase, np.nan), atol=1e-6)
    assert view.figure._suptitle.get_text() == f"run {uid[:8]}: 24 frames, complete"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"run {uid[:8]}: ")]
    assert "started (sample test-small, 24 points), model" in lines[0] and "on cpu" in lines[0]
    assert lines[-1].startswith(f"run {uid[:8]}: complete, 24 frames in ") and "0 dropped" in lines[-1]

    remote = LiveImageView(tiled_server.client, figure=figure())
    remote("start", {"uid": uid, "time": 0.0})
    remote("stop", {"uid": "s", "run_start": uid, "time": 0.0, "exit_status": "success"})
    assert remote.update()
    arrays, _ = read_image(tiled_server.client["processed"][uid]["ptychonn"])
    drawn = np.ma.filled(remote._images["amplitude"].get_array(), np.nan)
    np.testing.assert_allclose(drawn, np.where(arrays["weight"] > 0, arrays["amplitude"], np.nan), atol=1e-6)

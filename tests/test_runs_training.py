"""Training from prior runs pulled through databroker: labels, pty-chi label generation, models in Tiled,
fine-tuning that a running consumer picks up, and the bad inputs, each an error naming the run.

Real RunEngine, simulated devices writing HDF5, the session's in-process Tiled server, 32-pixel
frames, tiny networks and a few pty-chi epochs, so the file runs in well under a minute.
"""

import json
import uuid

import bluesky.preprocessors as bpp
import numpy as np
import pytest
import torch
from bluesky import RunEngine
from bluesky import plans as bp
from ophyd.sim import det
from tiled.queries import Key

from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.labels import iterative_run, read_iterative
from bluesky_ptychonn.archive.registry import register_model
from bluesky_ptychonn.archive.runs import scan_from_run
from bluesky_ptychonn.archive.servers import subscribe_archive
from bluesky_ptychonn.archive.training import fine_tune, train_from_runs, training_set_from_runs
from bluesky_ptychonn.cli import main
from bluesky_ptychonn.core.checkpoint import CheckpointInfo, load_model, read_info, save_checkpoint
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe, TrainConfig
from bluesky_ptychonn.core.geometry import ObjectGrid, extract_patches
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.iterative import IterativeOptions
from bluesky_ptychonn.core.network import PtychoNN
from bluesky_ptychonn.errors import ConfigurationError, RunError
from bluesky_ptychonn.live.callback import PtychoNNCallback
from bluesky_ptychonn.live.service import ModelSection, ModelWatcher
from bluesky_ptychonn.sim.physics import far_field

STEP_M = 2e-7
TINY = NetworkConfig(input_pixels=32, base_channels=4, depth=2)
# pty-chi 2.2.0 reads Python scalars from its (fixed) probe positions, a torch Parameter that requires grad.
ptychi_scalar_warning = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning"
)


@pytest.fixture
def fly(tiled_server, make_devices, tmp_path):
    """``fly(tag, shape=..., edit=None) -> uid``: one archived fly scan; ``edit`` changes its ptychography section."""
    run_engine = RunEngine({})
    subscribe_archive(run_engine, tiled_server.client)
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)

    def edited(edit):
        def mutate(msg):
            if msg.command == "open_run":
                section = dict(msg.kwargs["ptychography"])
                edit(section)
                return msg._replace(kwargs={**msg.kwargs, "ptychography": section})
            return msg

        return mutate

    def run(tag, shape=(6, 8), edit=None, step_m=STEP_M):
        plan = ptycho_fly_scan(detector, stage, step_m=step_m, shape=shape, exposure_s=2e-3, md={"campaign": tag})
        (uid,) = run_engine(bpp.msg_mutator(plan, edited(edit)) if edit else plan)
        return uid

    run.run_engine = run_engine
    return run


def test_truth_labels_line_up_with_their_frames(tiled_server, fly, small_sample):
    uid = fly(uuid.uuid4().hex)
    data = training_set_from_runs(tiled_server.raw, [uid], label_source="truth")
    assert data.frames.shape == (48, 32, 32) and data.amplitude.shape == data.phase.shape == (48, 32, 32)
    (source,) = data.sources
    assert source["run_uid"] == uid and source["label_source"] == "simulation_truth" and source["frames"] == 48

    # The labels are the sample's own truth at each recorded position (cut here from the whole
    # sample, not from the run's region in Tiled).
    labels = data.amplitude * np.exp(1j * data.phase)
    expected = extract_patches(small_sample.object, small_sample.grid.patch_corners(data.positions_m, 32), 32)
    np.testing.assert_allclose(labels, expected, atol=1e-4)

    # And they explain their own frames: the probe through each label predicts that frame's counts to
    # within Poisson noise (reduced chi-square near 1), unlike the label of a frame elsewhere in the scan.
    run = tiled_server.raw[uid]
    probe = scan_from_run(run, with_truth=False).probe
    photons = run.metadata["start"]["ptychography"]["photons_per_frame"]
    expected_counts = photons * far_field(labels * probe)

    def chi2(frames, model):
        return ((frames - model) ** 2 / (model + 1)).mean(axis=(1, 2))

    own, other = chi2(data.frames, expected_counts), chi2(data.frames, np.roll(expected_counts, 24, axis=0))
    assert own.max() < 1 and other.min() > 3 * own.max(), (own.max(), other.min())


@ptychi_scalar_warning
def test_iterative_labels_are_made_with_ptychi_stored_and_reused(tiled_server, fly, monkeypatch, capsys):
    client, raw = tiled_server.client, tiled_server.raw
    uid = fly(uuid.uuid4().hex, step_m=3e-7)  # about 3 pixels: a well-lit area that 20 epochs recover
    options = IterativeOptions(epochs=20, batch_size=16, device="cpu")
    data = training_set_from_runs(
        raw, [Key("campaign") == raw[uid].metadata["start"]["campaign"]], iterative_options=options
    )
    (source,) = data.sources
    assert source["label_source"] == "iterative" and source["computed_for_training"]
    assert (
        source["label_path"] == f"processed/{uid}/iterative" and source["engine"] == "epie" and source["epochs"] == 20
    )

    obj, grid, md = read_iterative(client, uid)
    section = raw[uid].metadata["start"]["ptychography"]
    assert grid == ObjectGrid.from_metadata(section["region_grid"]) and obj.shape == grid.shape
    node = client["processed"][uid]["iterative"]
    for key in ("amplitude", "phase", "illumination", "probe_amplitude", "probe_phase"):
        assert node[key].dtype == np.float32 and node[key].dims == ("y", "x"), key
    assert md["status"] == "complete" and md["engine"] == "epie" and md["epochs"] == 20 and md["step_size"] > 0
    assert md["probe"] == {"description": section["probe"], "refined": False} and md["device"] == "cpu"
    assert (
        md["photons_per_frame"] == section["photons_per_frame"] and md["photons_per_frame_source"] == "start document"
    )
    assert len(md["error_per_epoch"]) == 20 and md["error_per_epoch"][-1] < md["error_per_epoch"][0] / 2
    assert md["seconds"] > 0 and md["package_version"] and md["ptychi_version"] and md["grid"] == grid.as_metadata()

    # The labels agree with the truth where the probe lights the sample (a tiny, overlapping scan).
    truth = training_set_from_runs(raw, [uid], label_source="truth")
    centre = (slice(None), slice(10, 22), slice(10, 22))
    correlation = {
        key: np.corrcoef(getattr(data, key)[centre].ravel(), getattr(truth, key)[centre].ravel())[0, 1]
        for key in ("amplitude", "phase")
    }
    assert min(correlation.values()) > 0.9, correlation

    # A second training set reuses the stored reconstruction instead of running pty-chi again.
    again = training_set_from_runs(raw, [uid], label_source="iterative")
    assert not again.sources[0]["computed_for_training"]
    np.testing.assert_array_equal(again.phase, data.phase)

    # The command reconstructs it again and replaces the stored one.
    argv = ["iterative", uid, "--epochs", "3", "--batch-size", "16", "--device", "cpu"]
    assert main([*argv, *_tiled_args(tiled_server, monkeypatch)]) == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["raw_uid"] == uid and summary["epochs"] == 3 and summary["device"] == "cpu"
    assert read_iterative(client, uid)[2]["epochs"] == 3


def test_trained_model_records_its_runs_and_is_registered(tiled_server, fly, tmp_path, monkeypatch, capsys):
    tag = uuid.uuid4().hex
    uids = {fly(tag, shape=(2, 4)) for _ in range(2)}
    out = tmp_path / "models" / "from-runs.safetensors"
    _, trained = train_from_runs(
        tiled_server.raw,
        [Key("campaign") == tag],
        label_source="truth",
        network=TINY,
        config=TrainConfig(epochs=1, batch_size=8),
        device="cpu",
        out=out,
        progress=False,
    )
    info, _ = read_info(out)
    assert info.content_hash == trained.content_hash and set(info.provenance["run_uids"]) == uids
    assert info.provenance["label_source"] == "truth" and {s["run_uid"] for s in info.provenance["sources"]} == uids
    assert list(out.parent.iterdir()) == [out]  # published by rename: no temporary file left behind

    path = register_model(tiled_server.client, out)
    assert path == f"models/{info.content_hash}"
    registered = tiled_server.client["models"][info.content_hash].metadata
    assert set(registered["provenance"]["run_uids"]) == uids and registered["content_hash"] == info.content_hash
    assert "history" not in registered["metrics"] and registered["metrics"]["epochs_run"] == 1
    assert registered["checkpoint_file"] == out.name and registered["network"] == TINY.model_dump(mode="json")
    assert register_model(tiled_server.client, info) == path  # registering again changes nothing

    # The command line names the run it cannot find.
    missing = str(uuid.uuid4())
    argv = ["train-runs", missing, "--labels", "truth", "--out", str(tmp_path / "x.safetensors")]
    assert main([*argv, *_tiled_args(tiled_server, monkeypatch)]) == 2
    assert missing in capsys.readouterr().err


def test_fine_tuned_model_is_picked_up_by_the_running_consumer(tiled_server, fly, tmp_path, monkeypatch, capsys):
    tag = uuid.uuid4().hex
    uids = [fly(tag, shape=(2, 4)) for _ in range(3)]
    torch.manual_seed(5)  # not fit's seed, so weights close to these can only come from starting at them
    live = tmp_path / "live.safetensors"
    base = save_checkpoint(
        live, PtychoNN(TINY).eval(), CheckpointInfo(TINY, PreprocessRecipe(frame_shape=(32, 32), scale=0.05))
    )
    base_weights = load_model(live)[0].state_dict()
    callback = PtychoNNCallback(Predictor.from_checkpoint(live, device="cpu"), None)
    watcher = ModelWatcher(callback, ModelSection(checkpoint=live, device="cpu", reload_interval_s=0))

    argv = ["fine-tune", str(live), "--where", f"start.campaign={tag}", "--newest", "2", "--labels", "truth"]
    argv += ["--epochs", "2", "--learning-rate", "1e-5", "--batch-size", "4", "--device", "cpu"]
    assert main([*argv, *_tiled_args(tiled_server, monkeypatch)]) == 0
    summary = json.loads(capsys.readouterr().out)
    info, _ = read_info(live)
    assert summary["content_hash"] == info.content_hash and summary["registered"] == f"models/{info.content_hash}"
    assert info.provenance["run_uids"] == uids[1:] and info.provenance["label_source"] == "truth"
    assert info.provenance["fine_tuned_from"]["content_hash"] == base.content_hash
    assert info.recipe == base.recipe and info.network == TINY  # the scale the weights were trained with stays
    assert list(tmp_path.iterdir()) == [live]  # replaced by rename: no temporary file left behind

    assert watcher.check()  # the consumer's watcher swaps in the new model without a restart
    assert callback.predictor.info.content_hash == info.content_hash != base.content_hash
    tuned = callback.predictor.model.state_dict()
    assert max(float((tuned[k].cpu() - base_weights[k]).abs().max()) for k in tuned) < 1e-2


def test_self_supervised_fine_tune_adapts_to_one_run_without_labels(tiled_server, fly, tmp_path, monkeypatch, capsys):
    tag = uuid.uuid4().hex
    uid = fly(tag, shape=(3, 4))
    start = tmp_path / "start.safetensors"
    base = save_checkpoint(start, PtychoNN(TINY).eval(), CheckpointInfo(TINY, PreprocessRecipe(frame_shape=(32, 32))))
    out = tmp_path / "adapted.safetensors"
    argv = ["fine-tune", str(start), uid, "--self-supervised", "--minutes", "0.05", "--out", str(out)]
    assert main([*argv, "--device", "cpu", *_tiled_args(tiled_server, monkeypatch)]) == 0
    summary = json.loads(capsys.readouterr().out)
    info, _ = read_info(out)
    assert summary["content_hash"] == info.content_hash and summary["run_uids"] == [uid]
    assert info.provenance["label_source"] == "none (self-supervised)"
    assert info.provenance["adapted_from"]["content_hash"] == base.content_hash
    assert "run start document" in info.provenance["probe_source"] and info.recipe == base.recipe
    assert read_info(start)[0].content_hash == base.content_hash  # --out leaves the starting model alone

    fly(tag, shape=(2, 3))  # a second run of the campaign: adapting to two scans at once is refused
    argv = ["fine-tune", str(start), "--where", f"start.campaign={tag}", "--self-supervised", "--out", str(out)]
    assert main([*argv, *_tiled_args(tiled_server, monkeypatch)]) == 2
    assert "one run; the selection matched 2" in capsys.readouterr().err
    # A shipped base model is never overwritten in place.
    assert main(["fine-tune", "default-64", uid, "--self-supervised", *_tiled_args(tiled_server, monkeypatch)]) == 2
    assert "never replaced" in capsys.readouterr().err


def _tiled_args(tiled_server, monkeypatch):
    """Command-line arguments reaching the test server, its key in an environment variable (never in argv)."""
    monkeypatch.setenv("TEST_TILED_KEY", tiled_server.server.api_key)
    return ["--tiled-uri", tiled_server.server.uri.split("?")[0], "--api-key-env", "TEST_TILED_KEY"]


def test_bad_inputs_are_errors_naming_the_run(tiled_server, fly, tmp_path):
    client, raw, tag = tiled_server.client, tiled_server.raw, uuid.uuid4().hex
    good = fly(tag, shape=(2, 3))
    far = fly(tag, shape=(2, 3), edit=lambda s: s.update(distance_m=3.0))  # another detector distance
    no_probe = fly(tag, shape=(2, 3), edit=lambda s: s.pop("probe"))
    measured = fly(tag, shape=(2, 3), edit=lambda s: s.pop("simulation_truth"))
    (count,) = fly.run_engine(bp.count([det], 2))
    missing = str(uuid.uuid4())

    with pytest.raises(RunError, match=f"different geometry.*run {far}.*run {good}"):
        training_set_from_runs(raw, [good, far], label_source="truth")
    with pytest.raises(RunError, match=f"run {no_probe} has no probe"):
        training_set_from_runs(raw, [no_probe], label_source="iterative")
    with pytest.raises(RunError, match=f"run {no_probe} has no probe"):
        iterative_run(raw[no_probe], client)
    with pytest.raises(RunError, match=f"run {measured} is not simulated"):
        training_set_from_runs(raw, [measured], label_source="truth")
    with pytest.raises(RunError, match=f"run {count} .*not a ptychography run"):
        training_set_from_runs(raw, [good, count], label_source="truth")
    with pytest.raises(RunError, match=missing):
        training_set_from_runs(raw, [missing], label_source="truth")
    with pytest.raises(RunError, match="matches no run"):
        training_set_from_runs(raw, [(Key("campaign") == tag, Key("plan_name") == "count")], label_source="truth")
    with pytest.raises(RunError, match=f"run {missing} has no iterative reconstruction"):
        read_iterative(client, missing)

    binned = PreprocessRecipe(frame_shape=(32, 32), bin_factor=2)  # 16-pixel inputs of twice the pixel size
    net = NetworkConfig(input_pixels=16, base_channels=4, depth=2)
    save_checkpoint(tmp_path / "binned.safetensors", PtychoNN(net), CheckpointInfo(net, binned))
    with pytest.raises(ConfigurationError, match=f"16-pixel inputs.*run {good}"):
        fine_tune(tmp_path / "binned.safetensors", raw, [good], epochs=1, label_source="truth", progress=False)

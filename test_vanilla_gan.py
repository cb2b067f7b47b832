"""Tests for vanilla_gan.py: shapes, ranges, real training runs, resume, and every refusal.

Datasets here are small MNIST-format files the tests write and torchvision's own classes read.
Set MNIST_DIR to a folder holding MNIST/raw/ to also train on the real digits (CI does).
"""
import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vanilla_gan as vg

SCRIPT = Path(__file__).resolve().parent / "vanilla_gan.py"
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # downloads fail at once
FASHION_DEB = Path("/usr/share/datasets/fashion-mnist")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------
# Helpers: MNIST-format files, the CLI in a subprocess, the CLI in this process.
# ---------------------------------------------------------------------------------------------

def write_idx(path, tensor, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{tensor.dim()}I", *tensor.shape))
        f.write(tensor.contiguous().numpy().tobytes())


def write_dataset(root, folder="MNIST", n_train=512, n_test=64, pattern=None):
    """Synthetic 'digits': a bright bar on black at a random place, or one fixed pattern for all."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        if pattern is not None:
            images[:] = pattern
        else:
            for i in range(n):
                r, c = torch.randint(2, 18, (2,), generator=gen).tolist()
                images[i, r:r + 8, c:c + 3] = 255
                images[i, r + 3, c:c + 6] = 128
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", torch.randint(0, 10, (n,), dtype=torch.uint8,
                                                                        generator=gen), 2049)
    return Path(root)


def cli(*args, timeout=240, **popen):
    env = dict(os.environ, MPLBACKEND="Agg", **OFFLINE)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **popen)


def start_trainer(*args):
    """The CLI in a subprocess that keeps running: its lines can be read as they come."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def run_main(capsys, *args):
    """The CLI in this process: no interpreter start-up, same code path below main()."""
    code = vg.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, expected_code, *words):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def read_metrics(run_dir):
    import csv
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def losses(run_dir):
    return [(r["step"], r["Loss_D"], r["Loss_G"], r["D(x)"], r["D(G(z))"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The quality report's classifier cache, here and in every subprocess: never the user's own."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def smoke_runs(data_root, tmp_path_factory):
    """Two identical short CLI runs: the smoke test and the reproducibility test share them."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp("smoke") / name
        proc = cli("--data-dir", data_root, "--out-dir", out, "--epochs", 3, "--max-steps", 12,
                   "--batch-size", 64, "--log-every", 3, "--device", "cpu")
        runs.append((proc, out))
    return runs


def train_in_process(capsys, data_root, out_dir, *extra):
    code, out, err = run_main(capsys, "--data-dir", data_root, "--out-dir", out_dir, "--batch-size", 64,
                              "--log-every", 1, "--device", "cpu", *extra)
    assert code == 0, err
    return out


# ---------------------------------------------------------------------------------------------
# The networks.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 64])
def test_shapes(n):
    G, D = vg.Generator(), vg.Discriminator()
    images = G(torch.randn(n, 100))
    assert images.shape == (n, 1, 28, 28)
    assert D(images).shape == (n, 1)


def test_generator_stays_in_range_for_extreme_noise():
    G = vg.Generator()
    images = G(torch.randn(256, 100) * 1e4)
    assert images.min() >= -1 and images.max() <= 1


def test_discriminator_returns_logits_not_probabilities():
    D = vg.Discriminator()
    with torch.no_grad():
        D.net[-1].bias.fill_(50.0)  # a sigmoid output could never exceed 1
    assert (D(torch.zeros(4, 1, 28, 28)) > 1).all()


def test_train_step_updates_every_parameter():
    torch.manual_seed(0)
    G, D = vg.Generator(), vg.Discriminator()
    before = [p.clone() for p in [*G.parameters(), *D.parameters()]]
    opt_G, opt_D = vg.make_optimizer(G), vg.make_optimizer(D)
    stats = vg.train_step(G, D, opt_G, opt_D, torch.rand(32, 1, 28, 28) * 2 - 1, torch.randn(32, 100), False)
    assert stats.shape == (4,) and torch.isfinite(stats).all()
    for old, new in zip(before, [*G.parameters(), *D.parameters()]):
        assert not torch.equal(old, new)


def test_one_discriminator_pass_per_update_and_no_d_weight_grads_in_g_step():
    torch.manual_seed(0)
    G, D = vg.Generator(), vg.Discriminator()
    opt_G, opt_D = vg.make_optimizer(G), vg.make_optimizer(D)
    batch_sizes, d_grads_at_step = [], []
    D.register_forward_hook(lambda module, inputs, output: batch_sizes.append(inputs[0].shape[0]))
    d_step = opt_D.step
    opt_D.step = lambda: (d_grads_at_step.extend(p.grad.clone() for p in D.parameters()), d_step())
    vg.train_step(G, D, opt_G, opt_D, torch.rand(16, 1, 28, 28) * 2 - 1, torch.randn(16, 100), False)
    assert batch_sizes == [32, 16]  # real and fake together for D, the same fakes once more for G
    # The G step computed no weight gradients for D: they are exactly what D's own update used.
    for grad, p in zip(d_grads_at_step, D.parameters()):
        assert torch.equal(grad, p.grad)
    assert all(p.requires_grad for p in D.parameters())


def test_generator_learns_a_single_pattern():
    """Every real image is the same digit-like pattern: a few hundred steps pull G's samples to it."""
    torch.manual_seed(0)
    pattern = torch.full((28, 28), -1.0)
    pattern[6:22, 12:16] = 1.0
    G, D = vg.Generator(), vg.Discriminator()
    opt_G, opt_D = vg.make_optimizer(G), vg.make_optimizer(D)
    z_eval = torch.randn(256, 100)

    def distance():
        return (vg.sample(G, z_eval) - pattern).pow(2).mean().item()

    start = distance()
    real = pattern.expand(64, 1, 28, 28)
    for _ in range(300):
        vg.train_step(G, D, opt_G, opt_D, real, torch.randn(64, 100), False)
    assert distance() < 0.25 * start


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------

def test_data_pipeline_scales_to_minus_one_one(data_root):
    images = vg.to_unit_range(vg.load_dataset("mnist", data_root)[0])
    assert images.shape == (512, 1, 28, 28) and images.dtype == torch.float32
    assert images.min().item() == -1.0 and images.max().item() == 1.0


@pytest.mark.skipif(not os.environ.get("MNIST_DIR"), reason="set MNIST_DIR to the folder holding MNIST/raw")
def test_real_mnist_range_and_a_few_hundred_steps(tmp_path):
    images = vg.to_unit_range(vg.load_dataset("mnist", os.environ["MNIST_DIR"])[0])
    assert images.shape == (60000, 1, 28, 28)
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    proc = cli("--data-dir", os.environ["MNIST_DIR"], "--out-dir", tmp_path / "run", "--max-steps", 300,
               "--log-every", 50, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 6
    assert all(0 < float(r["D(x)"]) < 1 and float(r["Loss_G"]) > 0 for r in rows)
    assert "60000 training images" in proc.stdout


# ---------------------------------------------------------------------------------------------
# The CLI: a real training run, reproducibility, generation.
# ---------------------------------------------------------------------------------------------

def test_smoke_training_run_writes_every_output(smoke_runs):
    proc, out = smoke_runs[0]
    assert proc.returncode == 0, proc.stderr
    for name in ("samples/epoch_001.png", "losses.png", "metrics.csv", "generator.pt", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "samples" / "epoch_002.png").exists()  # epoch 2 stopped part-way: no grid named for it
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]
    assert all(torch.isfinite(torch.tensor([float(r[k]) for k in ("Loss_D", "Loss_G")])).all() for r in rows)
    for word in ("device cpu", "torch ", "512 training images", "Generator 559,632 parameters", "seed 42"):
        assert word in proc.stdout
    # the weights moved away from their initialisation (G is built first after seeding)
    torch.manual_seed(42)
    initial = vg.Generator().state_dict()
    trained = torch.load(out / "generator.pt", weights_only=True)["generator"]
    assert all(not torch.equal(initial[k], trained[k]) for k in initial if k.endswith("weight"))


def test_same_seed_gives_identical_losses(smoke_runs):
    (proc_a, out_a), (proc_b, out_b) = smoke_runs
    assert proc_a.returncode == 0 and proc_b.returncode == 0
    assert losses(out_a) == losses(out_b)


def test_generate_grid_from_a_trained_generator(smoke_runs, tmp_path):
    _, out = smoke_runs[0]
    proc = cli("--generate", 64, "--checkpoint", out / "generator.pt", "--out", tmp_path / "digits.png")
    assert proc.returncode == 0, proc.stderr
    from PIL import Image
    assert Image.open(tmp_path / "digits.png").size == (8 * 30 + 2, 8 * 30 + 2)


def test_generate_tensor_nrow_seed_and_checkpoint_file(smoke_runs, tmp_path, capsys):
    _, out = smoke_runs[0]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        code, _, err = run_main(capsys, "--generate", 10, "--checkpoint", out / "checkpoint.pt",
                                "--seed", seed, "--out", tmp_path / f"{name}.pt")
        assert code == 0, err
    a, b, c = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "abc")
    assert a.shape == (10, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    code, _, err = run_main(capsys, "--generate", 16, "--checkpoint", out, "--nrow", 4)
    assert code == 0, err
    from PIL import Image
    assert Image.open(out / "generated.png").size == (4 * 30 + 2, 4 * 30 + 2)


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume.
# ---------------------------------------------------------------------------------------------

def test_checkpoint_holds_everything_to_continue(smoke_runs):
    _, out = smoke_runs[0]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("generator", "discriminator", "opt_G", "opt_D", "epoch", "step", "generator_args", "fixed_noise",
                "rng", "metrics", "order", "args"):
        assert key in ckpt, key
    assert ckpt["step"] == 12 and ckpt["generator_args"]["hidden"] == [256, 512]
    assert "max_steps" not in ckpt["args"]  # it limits one invocation, not the run
    assert not (out / "checkpoint.pt.tmp").exists()


def test_resume_is_exact(data_root, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_in_process(capsys, data_root, straight, "--epochs", 2)
    train_in_process(capsys, data_root, split, "--epochs", 1)
    code, out, err = run_main(capsys, "--resume", split, "--epochs", 2)
    assert code == 0, err
    assert "resuming" in out
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    for net in ("generator", "discriminator"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net])
    assert losses(straight) == losses(split) and len(losses(split)) == 16
    assert all(torch.equal(a["generator_avg"][k], b["generator_avg"][k]) for k in a["generator_avg"])
    grids = sorted(p.name for p in (split / "samples").iterdir())
    assert grids == ["epoch_001.png", "epoch_002.png", "progress.gif"]


def test_resume_refuses_model_changes_and_honours_training_flags(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--epochs", 1)
    code, _, err = run_main(capsys, "--resume", run, "--latent-dim", 64, "--g-hidden", 128)
    assert_refused(code, err, 2, "--latent-dim", "--g-hidden")
    code, out, err = run_main(capsys, "--resume", run / "checkpoint.pt", "--epochs", 2, "--log-every", 4)
    assert code == 0, err
    assert [int(r["step"]) for r in read_metrics(run)][-2:] == [12, 16]


def test_out_dir_with_a_run_is_not_overwritten(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--max-steps", 2)
    before = (run / "checkpoint.pt").read_bytes()
    code, _, err = run_main(capsys, "--data-dir", data_root, "--out-dir", run)
    assert_refused(code, err, 1, "already holds a run", "--resume")
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_resume_finishes(data_root, tmp_path, capsys, sig, expected):
    run = tmp_path / "run"
    proc = start_trainer("--data-dir", data_root, "--out-dir", run, "--batch-size", 64, "--epochs", 1000,
                         "--log-every", 1, "--device", "cpu")
    wait_for(proc, "Loss_D")  # training is under way
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == expected, err
    assert "--resume" in out and "Traceback" not in err
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert step > 0
    code, _, err = run_main(capsys, "--resume", run, "--max-steps", step + 3)
    assert code == 0, err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == step + 3


def test_divergence_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--epochs", 1)
    before = (run / "checkpoint.pt").read_bytes()
    code, _, err = run_main(capsys, "--resume", run, "--epochs", 2, "--lr", 1e30)
    assert_refused(code, err, 1, "diverged", "NaN")
    assert (run / "checkpoint.pt").read_bytes() == before


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data_root, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--epochs", 1)
    before = (run / "checkpoint.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_main(capsys, "--resume", run, "--epochs", 2)
    assert_refused(code, err, 1, "disk is full", "intact")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# Loading files that are not ours.
# ---------------------------------------------------------------------------------------------

class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):  # unpickling this calls Path.touch(target)
        return (Path.touch, (Path(self.target),))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    evil, target = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"format": "vanilla_gan", "generator": Payload(target)}, evil)
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", evil)
    assert_refused(code, err, 1, "not a readable vanilla_gan checkpoint", "could run code")
    code, _, err = run_main(capsys, "--resume", evil)
    assert_refused(code, err, 1, "not a readable vanilla_gan checkpoint", "could run code")
    assert not target.exists()


def test_foreign_truncated_and_future_files_are_refused(smoke_runs, tmp_path, capsys):
    _, out = smoke_runs[0]
    foreign, truncated, future = tmp_path / "foreign.pt", tmp_path / "truncated.pt", tmp_path / "future.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    truncated.write_bytes((out / "generator.pt").read_bytes()[:5000])
    data = torch.load(out / "generator.pt", weights_only=True)
    torch.save({**data, "version": 99}, future)
    for path, words in ((foreign, ["not a vanilla_gan checkpoint"]), (truncated, ["not a readable", "truncated"]),
                        (future, ["incompatible version"]), (tmp_path / "missing.pt", ["no checkpoint"])):
        code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", path)
        assert_refused(code, err, 1, *words)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, a non-zero exit, no traceback.
# ---------------------------------------------------------------------------------------------

def test_missing_dataset_offline_in_a_real_subprocess(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli("--data-dir", tmp_path / "empty", cwd=tmp_path)
    assert_refused(proc.returncode, proc.stderr, 1, "could not be downloaded", str(tmp_path / "empty"),
                   "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "--data-dir",
                   "no network: connection refused")  # the reason, not an exception's class name
    assert "RuntimeError" not in proc.stderr and "URLError" not in proc.stderr
    assert list(tmp_path.rglob("*")) == [tmp_path / "empty"]  # no MNIST/raw/ left behind, no runs/


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size", "--lr", "--latent-dim", "--log-every",
                                  "--max-steps", "--generate"])
@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_non_positive_or_non_numeric_values(capsys, flag, value):
    code, _, err = run_main(capsys, f"{flag}={value}")
    assert_refused(code, err, 2, flag)


@pytest.mark.parametrize("args, code, words", [
    (["--device", "tpu"], 2, ["--device", "'tpu'", "cuda:N"]),
    (["--generate", "4"], 2, ["--checkpoint"]),
    (["--generate", "4", "--checkpoint", "x.pt", "--epochs", "3"], 2, ["--epochs", "does not apply"]),
    (["--nrow", "4"], 2, ["--nrow", "--generate"]),
])
def test_argument_errors(capsys, args, code, words):
    assert_refused(*run_main(capsys, *args)[::2], code, *words)


def test_device_not_present(capsys, tmp_path):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    code, _, err = run_main(capsys, "--device", device, "--out-dir", tmp_path / "run")
    assert_refused(code, err, 1, f"--device {device}")


def test_batch_larger_than_the_dataset(capsys, data_root, tmp_path):
    code, _, err = run_main(capsys, "--data-dir", data_root, "--out-dir", tmp_path / "run", "--batch-size", 513)
    assert_refused(code, err, 2, "--batch-size 513", "512 images")


def test_data_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run_main(capsys, "--data-dir", tmp_path / "file", "--out-dir", tmp_path / "run")
    assert_refused(code, err, 1, "is a file")


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["train-images-idx3-ubyte", "truncated"]),
    ("magic", ["train-images-idx3-ubyte", "wrong magic number"]),
    ("directory", ["train-images-idx3-ubyte", "cannot read"]),
])
def test_corrupt_dataset_files_are_named(capsys, tmp_path, damage, words):
    root = write_dataset(tmp_path / "data", n_train=64, n_test=8)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = images.read_bytes()
    if damage == "truncate":
        images.write_bytes(data[:-100])
    elif damage == "magic":
        images.write_bytes(struct.pack(">I", 1234) + data[4:])
    else:
        images.unlink()
        images.mkdir()
    code, _, err = run_main(capsys, "--data-dir", root, "--out-dir", tmp_path / "run")
    assert_refused(code, err, 1, *words)


def test_out_dir_that_cannot_be_created(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    code, out, err = run_main(capsys, "--out-dir", tmp_path / "file" / "run", "--data-dir", tmp_path / "nowhere")
    assert_refused(code, err, 1, "cannot write to the run folder")
    assert "training images" not in out  # refused before any data was touched


def test_an_unforeseen_error_is_one_line_too(capsys, monkeypatch, tmp_path):
    def broken(*args):
        raise RuntimeError("something nobody planned for")

    monkeypatch.setattr(vg, "train", broken)
    code, _, err = run_main(capsys, "--out-dir", tmp_path / "run")
    assert_refused(code, err, 1, "RuntimeError: something nobody planned for", "--debug")
    assert not (tmp_path / "run").exists()  # the empty run folder was taken away again
    with pytest.raises(RuntimeError):
        vg.main(["--out-dir", str(tmp_path / "run"), "--debug"])


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(vg.GanError):
        vg.main(["--epochs", "0", "--debug"])


# ---------------------------------------------------------------------------------------------
# Speed options, configurations and datasets: each trains a few steps.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--amp"], ["--no-amp"], ["--compile", "--no-amp"]])
def test_speed_options_train(capsys, data_root, tmp_path, flags):
    out = train_in_process(capsys, data_root, tmp_path / "run", "--max-steps", 3, *flags)
    assert f"amp {'--amp' in flags}" in out and f"compile {'--compile' in flags}" in out
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("name", list(vg.CONFIGS))
def test_each_config_trains_and_generates_without_flags(capsys, data_root, tmp_path, name):
    run = tmp_path / "run"
    code, out, err = run_main(capsys, "--config", name, "--data-dir", data_root, "--out-dir", run,
                              "--max-steps", 3, "--device", "cpu")
    assert code == 0, err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    for flag, value in vg.CONFIGS[name].items():
        assert ckpt["args"][flag] == value, flag
    G = vg.Generator(**ckpt["generator_args"])
    G.load_state_dict(ckpt["generator"])
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in G.modules()) == (name == "batchnorm")
    # one image: a BatchNorm generator in training mode could not even normalise a batch of one
    code, _, err = run_main(capsys, "--generate", 1, "--checkpoint", run, "--out", tmp_path / "one.pt")
    assert code == 0, err
    assert torch.load(tmp_path / "one.pt", weights_only=True).shape == (1, 1, 28, 28)


def test_a_typed_flag_overrides_the_config_and_resume_keeps_it(capsys, data_root, tmp_path):
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--config", "deep", "--d-hidden", 64, "--epochs", 1)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["args"]
    assert saved["d_hidden"] == [64] and saved["g_hidden"] == [256, 512, 1024] and saved["g_activation"] == "relu"
    code, out, err = run_main(capsys, "--resume", run, "--epochs", 2)  # no flags: the run's own come back
    assert code == 0, err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 16


def test_an_unknown_config_is_refused(capsys):
    code, _, err = run_main(capsys, "--config", "huge")
    assert_refused(code, err, 2, "--config", "'huge'", "minimal")


def test_betas_and_sample_every(capsys, data_root, tmp_path):
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--max-steps", 4, "--sample-every", 2, "--beta1", 0.3,
                     "--beta2", 0.95)
    assert {p.name for p in (run / "samples").iterdir()} == {"step_0000002.png", "step_0000004.png"}
    group = torch.load(run / "checkpoint.pt", weights_only=True)["opt_G"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.3, 0.95)


def test_kmnist_through_torchvision(capsys, tmp_path):
    root = write_dataset(tmp_path / "data", folder="KMNIST", n_train=128, n_test=8)
    out = train_in_process(capsys, root, tmp_path / "run", "--dataset", "kmnist", "--max-steps", 2)
    assert "dataset kmnist: 128 training images" in out


@pytest.mark.skipif(not FASHION_DEB.is_dir(), reason="apt-get install dataset-fashion-mnist (.ci/run does)")
def test_fashion_mnist_from_debian_files(capsys, tmp_path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION_DEB.glob("*.gz"):
        shutil.copy(f, raw)
    out = train_in_process(capsys, tmp_path / "data", tmp_path / "run", "--dataset", "fashion-mnist",
                           "--max-steps", 2)
    assert "dataset fashion-mnist: 60000 training images" in out


def test_fake_dataset_is_a_device_check(capsys, tmp_path):
    out = train_in_process(capsys, tmp_path / "nowhere", tmp_path / "run", "--dataset", "fake", "--max-steps", 3)
    assert "dataset fake: 60000 training images (random)" in out
    assert "device check: on the CPU there is nothing to compare against" in out
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", tmp_path / "run", "--eval",
                            "--out", tmp_path / "x.png")
    assert_refused(code, err, 1, "trained on random data", "no quality report")
    assert not (tmp_path / "x.png").exists()  # refused before any work
    assert not (tmp_path / "nowhere").exists()


@cuda
def test_cuda_training_and_cpu_generation(tmp_path):
    run = tmp_path / "run"
    proc = cli("--dataset", "fake", "--device", "cuda", "--out-dir", run, "--max-steps", 20, "--log-every", 10)
    assert proc.returncode == 0, proc.stderr
    assert "device check passed: cuda" in proc.stdout and "x this CPU" in proc.stdout and "CUDA " in proc.stdout
    proc = cli("--generate", 8, "--checkpoint", run / "checkpoint.pt", "--device", "cpu",
               "--out", tmp_path / "x.pt")
    assert proc.returncode == 0, proc.stderr


@cuda
@pytest.mark.parametrize("flags", [["--amp"], ["--compile"]])
def test_cuda_speed_options(tmp_path, flags):
    proc = cli("--dataset", "fake", "--device", "cuda", "--out-dir", tmp_path / "run", "--max-steps", 5, *flags)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# The quality report: classifier FID, Inception Score, class coverage.
# ---------------------------------------------------------------------------------------------

def write_labelled_dataset(root, n_train=2000, n_test=500):
    """Ten classes a classifier can learn in seconds: class k is a bright square at its own place."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        for i, k in enumerate(labels.tolist()):
            r, c = 2 + (k // 5) * 13 + torch.randint(0, 3, (1,), generator=gen).item(), 1 + (k % 5) * 5
            images[i, r:r + 8, c:c + 4] = torch.randint(180, 256, (1,), generator=gen).item()
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8), 2049)
    return Path(root)


class FixedImages(torch.nn.Module):
    """A stand-in generator that returns given images in turn, whatever the noise."""

    def __init__(self, images):
        super().__init__()
        self.images, self.next, self.latent_dim = images, 0, 100
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so the judge can ask for its device

    def forward(self, z):
        index = (torch.arange(len(z)) + self.next) % len(self.images)
        self.next += len(z)
        return self.images[index]


@pytest.fixture(scope="session")
def labelled_root(tmp_path_factory):
    return write_labelled_dataset(tmp_path_factory.mktemp("labelled"))


@pytest.fixture(scope="session")
def judge(labelled_root, tmp_path_factory):
    return vg.QualityJudge("mnist", labelled_root, torch.device("cpu"), samples=2000)


def test_frechet_distance_of_a_gaussian_with_itself_is_zero_and_it_is_symmetric():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 8, generator=gen,
                                                                             dtype=torch.float64)
    b = torch.randn(3000, 8, generator=gen, dtype=torch.float64) * 2 + 1
    assert abs(vg.frechet_distance(a, a)) < 1e-6
    assert vg.frechet_distance(a, b) == pytest.approx(vg.frechet_distance(b, a), rel=1e-6)
    # in one dimension it is (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2
    x, y = a[:, :1], b[:, :1]
    expected = (x.mean() - y.mean()) ** 2 + (x.std() - y.std()) ** 2
    assert vg.frechet_distance(x, y) == pytest.approx(expected.item(), rel=1e-6)


def test_real_digits_beat_noise_and_a_collapsed_generator_is_caught(judge, labelled_root, capsys):
    images, labels = vg.load_dataset("mnist", labelled_root, train=True)
    held_out = vg.to_unit_range(images[1000:])  # the judge's reference used the first 10,000 (all 2000)
    real = judge(FixedImages(held_out), 1, 1)
    assert "warning" not in capsys.readouterr().out
    noise = judge(FixedImages(torch.rand(500, 1, 28, 28) * 2 - 1), 1, 2)
    threes = held_out[labels[1000:] == 3][:1]
    capsys.readouterr()
    collapsed = judge(FixedImages(threes), 1, 3)
    assert "warning: classes 0, 1, 2, 4, 5, 6, 7, 8, 9 under 5% of samples" in capsys.readouterr().out
    assert real["FID"] * 10 < noise["FID"]
    assert collapsed["FID"] > real["FID"]
    assert real["IS"] > 8 and collapsed["IS"] < 1.5
    assert real["min_share"] > 0.05 and collapsed["share_3"] == 1.0
    assert real["FID_real"] == collapsed["FID_real"] and real["FID_real"] < real["FID"] + 1


def test_classifier_is_cached_reused_and_retrained_when_damaged(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_labelled_dataset(tmp_path / "data", n_train=500, n_test=100)
    cpu = torch.device("cpu")
    splits = vg.load_dataset("mnist", root, train=True), vg.load_dataset("mnist", root, train=False)
    vg.load_classifier("mnist", *splits, cpu)
    assert "training a classifier" in capsys.readouterr().out
    [cache] = (tmp_path / "cache" / "vanilla-gan").glob("classifier-*-mnist-*.pt")
    vg.load_classifier("mnist", *splits, cpu)
    assert "training" not in capsys.readouterr().out
    cache.write_bytes(b"garbage")
    vg.load_classifier("mnist", *splits, cpu)
    assert "training a classifier" in capsys.readouterr().out
    assert vg.load_file(cache, cpu)[1]["kind"] == "classifier"  # the damaged cache was replaced
    other = write_labelled_dataset(tmp_path / "other", n_train=500, n_test=90)  # other data, other cache
    other_splits = vg.load_dataset("mnist", other), vg.load_dataset("mnist", other, train=False)
    vg.load_classifier("mnist", *other_splits, cpu)
    assert "training a classifier" in capsys.readouterr().out


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. matplotlib's "no artists": an empty FID panel
def test_eval_during_training_writes_quality_csv_and_a_plot_panel(tmp_path, capsys):
    root, run = write_labelled_dataset(tmp_path / "data", n_train=512, n_test=100), tmp_path / "run"
    out = train_in_process(capsys, root, run, "--epochs", 2, "--eval-every", 1, "--eval", "--log-every", 4)
    import csv
    with open(run / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and out.count("quality of the averaged G at step") == 2
    assert out.count("quality of the last G, not averaged at step 16") == 1  # once, at the end
    assert all(float(r["FID"]) > 0 and 1 <= float(r["IS"]) <= 10 for r in rows)
    assert len(torch.load(run / "checkpoint.pt", weights_only=True)["quality"]) == 2
    from PIL import Image
    assert Image.open(run / "losses.png").size[0] == 1500  # three panels: losses, D's outputs, FID
    code, out, err = run_main(capsys, "--generate", 16, "--checkpoint", run / "generator.pt", "--eval",
                              "--data-dir", root)
    assert code == 0, err
    assert "quality: FID" in out


def test_no_quality_report_for_random_data(capsys):
    code, _, err = run_main(capsys, "--dataset", "fake", "--eval")
    assert_refused(code, err, 2, "no quality report exists for random data")


# ---------------------------------------------------------------------------------------------
# The averaged generator, dropout in D, and training you can watch.
# ---------------------------------------------------------------------------------------------

def test_the_averaged_generator_is_the_ema_of_g():
    torch.manual_seed(0)
    G, D = vg.Generator(batchnorm=True), vg.Discriminator()
    opt_G, opt_D = vg.make_optimizer(G), vg.make_optimizer(D)
    ema = vg.EMA(G, decay=0.9)
    expected = {k: v.clone() for k, v in G.state_dict().items()}
    pixels = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    for step, _ in enumerate(vg.train_epoch(G, D, opt_G, opt_D, pixels, 16, ema=ema), 1):  # 4 steps
        decay = min(0.9, (1 + step) / (10 + step))  # warming up: 0.18, 0.25, 0.31, 0.36
        for name, value in G.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * value.detach()
    averaged = ema.G.state_dict()
    for name, value in G.state_dict().items():
        if "running" in name or "num_batches" in name:  # BatchNorm's statistics: copied
            assert torch.equal(averaged[name], value), name
        else:
            assert torch.allclose(averaged[name], expected[name], atol=1e-6), name
            assert not torch.equal(averaged[name], value), name
    assert not any(p.requires_grad for p in ema.G.parameters())


@pytest.mark.parametrize("decay", [0, 0.999])
def test_generator_pt_holds_the_averaged_g_unless_ema_decay_is_0(capsys, data_root, tmp_path, decay):
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--max-steps", 5, "--ema-decay", decay)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    sampled = torch.load(run / "generator.pt", weights_only=True)["generator"]
    source = ckpt["generator_avg"] if decay else ckpt["generator"]
    assert (ckpt["generator_avg"] is None) == (decay == 0)
    assert all(torch.equal(sampled[k], source[k]) for k in sampled)
    if decay:
        assert not all(torch.equal(sampled[k], ckpt["generator"][k]) for k in sampled)


def test_dropout_in_d_is_active_in_both_updates():
    torch.manual_seed(0)
    G, D = vg.Generator(), vg.Discriminator()  # the default rate, 0.4
    dropped = []
    first_dropout = next(m for m in D.modules() if isinstance(m, torch.nn.Dropout))
    first_dropout.register_forward_hook(lambda m, inputs, out: dropped.append(
        ((out == 0) & (inputs[0] != 0)).float().mean().item()))
    vg.train_step(G, D, vg.make_optimizer(G), vg.make_optimizer(D), torch.rand(64, 1, 28, 28) * 2 - 1,
                  torch.randn(64, 100))
    assert len(dropped) == 2  # the D update's pass and the G update's pass
    assert all(0.3 < share < 0.5 for share in dropped), dropped
    assert not any(isinstance(m, torch.nn.Dropout) for m in vg.Discriminator(dropout=0).modules())


def test_progress_gif_has_one_frame_per_epoch_across_a_resume(capsys, data_root, tmp_path):
    from PIL import Image
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--epochs", 2, "--log-every", 4)
    code, _, err = run_main(capsys, "--resume", run, "--epochs", 3)
    assert code == 0, err
    with Image.open(run / "samples" / "progress.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (242, 242)
    assert not list((run / "samples").glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# A newcomer's mistakes, each with the right answer.
# ---------------------------------------------------------------------------------------------

def test_a_smoke_run_grows_into_a_real_run(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--max-steps", 3)
    out = train_in_process(capsys, data_root, run, "--resume", run, "--epochs", 1)  # --max-steps does not come back
    assert "nothing to do" not in out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8  # 512 images / 64: one epoch


@pytest.mark.parametrize("too_deep", ["MNIST/raw", "MNIST"])
def test_data_dir_one_level_too_deep_says_which_to_use_and_creates_nothing(tmp_path, too_deep, capsys, monkeypatch):
    root = write_dataset(tmp_path / "data", n_train=64, n_test=8)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "--data-dir", root / too_deep)
    assert_refused(code, err, 1, f"use --data-dir {root}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no folders, no runs/


def test_only_the_missing_file_is_named(tmp_path, capsys, monkeypatch):
    root = write_dataset(tmp_path / "data", n_train=64, n_test=8)
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    for variable, proxy in OFFLINE.items():
        monkeypatch.setenv(variable, proxy)
    code, _, err = run_main(capsys, "--data-dir", root, "--out-dir", tmp_path / "run")
    assert_refused(code, err, 1, "(t10k-labels-idx1-ubyte)")
    assert "train-images" not in err and not (tmp_path / "run").exists()


def test_generation_runs_in_chunks_and_a_huge_grid_is_refused_at_once(smoke_runs, tmp_path, capsys, monkeypatch):
    _, out = smoke_runs[0]
    chunks = []
    real_sample = vg.sample
    monkeypatch.setattr(vg, "sample", lambda G, z: chunks.append(len(z)) or real_sample(G, z))
    code, _, err = run_main(capsys, "--generate", 1_000_000, "--checkpoint", out, "--out", tmp_path / "big.png")
    assert_refused(code, err, 1, "too many images for one picture", "10,000", ".pt")
    assert chunks == []  # refused before any work
    code, _, err = run_main(capsys, "--generate", 25_000, "--checkpoint", out, "--out", tmp_path / "many.pt")
    assert code == 0, err
    assert chunks == [10_000, 10_000, 5_000]
    assert torch.load(tmp_path / "many.pt", weights_only=True).shape == (25_000, 1, 28, 28)


def test_files_that_are_not_pytorch_files_are_called_that(smoke_runs, capsys):
    _, out = smoke_runs[0]
    for path in (out / "samples" / "epoch_001.png", out / "metrics.csv"):
        code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", path)
        assert_refused(code, err, 1, "not a file PyTorch wrote")
        assert "run code" not in err and "IndexError" not in err
        code, _, err = run_main(capsys, "--resume", path)
        assert_refused(code, err, 1, "not a file PyTorch wrote")


BIG = ["--g-hidden", 2048, 2048, "--d-hidden", 2048, 2048, "--batch-size", 64, "--log-every", 1, "--device", "cpu"]


def interrupt_twice(*args):
    """A real trainer that gets Ctrl-C once it is under way, and again as soon as it says it is stopping.
    The networks are large, so the second one lands while it finishes its step or saves."""
    proc = start_trainer(*args)
    for line in proc.stdout:
        if "Loss_D" in line:
            proc.send_signal(signal.SIGINT)
        if "SIGINT received" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_twice_says_what_was_saved(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = interrupt_twice("--data-dir", data_root, "--out-dir", run, *BIG)
    assert_refused(code, err, 130, "aborted at step", "nothing was saved")
    assert not run.exists()  # nothing was saved, so no empty run folder either
    code, _, err = run_main(capsys, "--data-dir", data_root, "--out-dir", run, "--max-steps", 2, *BIG)
    assert code == 0, err
    before = (run / "checkpoint.pt").read_bytes()
    code, err = interrupt_twice("--resume", run, "--log-every", 1)
    assert_refused(code, err, 130, "aborted at step", "the checkpoint holds step 2", f"--resume {run}")
    assert not list(run.rglob("*.tmp"))  # no half-written file
    assert (run / "checkpoint.pt").read_bytes() == before


def test_out_that_is_a_folder_or_has_no_extension_and_jpg_works(smoke_runs, tmp_path, capsys):
    _, out = smoke_runs[0]
    for target, words in ((tmp_path, ["is a folder", "digits.png"]), (tmp_path / "digits", ["has no extension", ".pt"]),
                          (tmp_path / "digits.xyz", ["cannot write (.xyz)", ".png"])):
        code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", out, "--out", target)
        assert_refused(code, err, 1, str(target), *words)
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", out, "--out", tmp_path / "digits.jpg")
    assert code == 0, err
    from PIL import Image
    assert Image.open(tmp_path / "digits.jpg").format == "JPEG"


def test_a_typo_gets_a_suggestion():
    proc = cli("--epcohs", 1)
    assert_refused(proc.returncode, proc.stderr, 2, "unrecognized arguments: --epcohs", "did you mean --epochs?")


def test_divergence_that_stays_finite_is_stopped_and_leaves_no_lone_files(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_main(capsys, "--data-dir", data_root, "--out-dir", run, "--batch-size", 64, "--log-every", 1,
                            "--lr", 2e4, "--device", "cpu")
    assert_refused(code, err, 1, "training diverged", "above 100", "nothing was saved", "smaller --lr")
    assert "intact" not in err and not run.exists()


def test_one_changed_identity_flag_differs(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(capsys, data_root, run, "--max-steps", 2)
    code, _, err = run_main(capsys, "--resume", run, "--batch-size", 32)
    assert_refused(code, err, 2, "--batch-size differs from the checkpoint's", "drop it")
    code, _, err = run_main(capsys, "--resume", run, "--config", "deep")
    assert_refused(code, err, 2, "--config deep sets --g-hidden, --d-hidden, --g-activation, --d-dropout, which "
                   "differ from the checkpoint's", "drop it")


def test_help_is_a_return_value_and_names_the_run_folder(capsys):
    assert vg.main(["--help"]) == 0  # a notebook survives it: no SystemExit
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--checkpoint CHECKPOINT a run folder, or its generator.pt or checkpoint.pt" in help_text
    assert "--config {default,minimal,deep,batchnorm}" in help_text


def test_the_readme_notebook_block_runs_as_written(tmp_path):
    """The README's notebook example, extracted from README.md, with MNIST under ./data."""
    readme = (SCRIPT.parent / "README.md").read_text()
    block = readme.split("## Use it from a notebook", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    source = Path(os.environ["MNIST_DIR"]) if os.environ.get("MNIST_DIR") else None
    if source is None:
        write_dataset(tmp_path / "data", n_train=2048, n_test=64)
    else:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "MNIST").symlink_to((source / "MNIST").resolve())
    script = tmp_path / "notebook.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r})\n" + block)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "notebook_grid.png").is_file()
    assert (tmp_path / "runs" / "notebook" / "checkpoint.pt").is_file()


# ---------------------------------------------------------------------------------------------
# One trainer per run folder; the device check.
# ---------------------------------------------------------------------------------------------

def wait_for(proc, text):
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"the trainer ended before printing {text!r}: {proc.stderr.read()}")


def test_a_run_folder_has_one_trainer_at_a_time(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    first = start_trainer("--data-dir", data_root, "--out-dir", run, "--batch-size", 64, "--max-steps", 200,
                          "--log-every", 1, "--device", "cpu")
    wait_for(first, "Loss_D")  # training, no checkpoint yet
    code, _, err = run_main(capsys, "--data-dir", data_root, "--out-dir", run)  # a new run in the same folder
    assert_refused(code, err, 1, "in use by another process", f"PID {first.pid}")
    wait_for(first, "epoch 1/")
    wait_for(first, "Loss_D")  # training on in epoch 2: its first checkpoint is saved
    code, _, err = run_main(capsys, "--resume", run)
    assert_refused(code, err, 1, "in use by another process", f"PID {first.pid}")
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", run, "--out", tmp_path / "x.pt")  # reading is fine
    assert code == 0, err
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert [int(r["step"]) for r in read_metrics(run)] == list(range(1, 201))  # untouched by the others
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 200


def test_resume_after_kill_9(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    trainer = start_trainer("--data-dir", data_root, "--out-dir", run, "--batch-size", 64, "--epochs", 1000,
                            "--log-every", 1, "--device", "cpu")
    wait_for(trainer, "epoch 1/")
    wait_for(trainer, "Loss_D")  # training on in epoch 2: its first checkpoint is saved
    trainer.kill()
    trainer.communicate(timeout=60)
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    code, _, err = run_main(capsys, "--resume", run, "--max-steps", step + 2)  # no stale lock in the way
    assert code == 0, err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == step + 2


def test_device_check_cpu_against_cpu_passes():
    args = vg.parse_args(["--dataset", "fake", "--batch-size", "32"])[0]
    difference, cpu_images_per_second = vg.device_check(args, torch.device("cpu"), steps=5)
    assert difference == 0 and cpu_images_per_second > 0


def test_device_check_names_a_difference_and_exits_1(monkeypatch, capsys, tmp_path):
    real_step, calls = vg.train_step, []

    def one_wrong_step(G, D, *rest):  # the device side runs first: its third step goes wrong
        stats = real_step(G, D, *rest)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                G.net[0].weight[0, 0] += 0.5
        return stats

    monkeypatch.setattr(vg, "train_step", one_wrong_step)
    args = vg.parse_args(["--dataset", "fake", "--batch-size", "32"])[0]
    with pytest.raises(vg.GanError) as refusal:
        vg.device_check(args, torch.device("cpu"), steps=5)
    assert refusal.value.code == 1
    assert "device check failed" in str(refusal.value) and "differs from the CPU's" in str(refusal.value)


def test_a_moved_run_resumes_in_its_new_folder_and_machine_flags_are_not_saved(data_root, tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "new"
    train_in_process(capsys, data_root, old, "--max-steps", 3, "--eval")
    saved = torch.load(old / "checkpoint.pt", weights_only=True)["args"]
    assert not {"device", "amp", "compile", "eval", "out_dir", "max_steps"} & set(saved)
    old.rename(new)
    code, out, err = run_main(capsys, "--resume", new, "--max-steps", 5)
    assert code == 0, err
    assert f"run folder {new}" in out and not old.exists()
    assert torch.load(new / "checkpoint.pt", weights_only=True)["step"] == 5
    assert "quality" not in out  # --eval belonged to the first invocation

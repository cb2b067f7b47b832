"""Tests for vanilla_gan.py, on small MNIST-format files that torchvision reads. MNIST_DIR, a
folder holding MNIST/raw/, gives the README's notebook block the real digits."""
import contextlib
import errno
import gzip
import io
import math
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
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = ["--batch-size", 64, "--log-every", 3, "--device", "cpu", "--epochs", 3]  # 8 steps/epoch


def write_idx(path, tensor, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{tensor.dim()}I", *tensor.shape))
        f.write(tensor.contiguous().numpy().tobytes())


def write_dataset(root, folder="MNIST", n_train=512, n_test=64):
    """Stand-in digits: class k is a square at its own place, of a random brightness."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n) % 10
        for i, k in enumerate(labels.tolist()):
            r, c = 2 + k // 5 * 13 + torch.randint(0, 3, (1,), generator=gen).item(), 1 + k % 5 * 5
            images[i, r:r + 8, c:c + 4] = torch.randint(180, 256, (1,), generator=gen).item()
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8), 2049)
    return Path(root)


def run_main(capsys, *args):
    code = vg.main(list(args))
    return (code, *capsys.readouterr())


def cli(*args, **popen):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1", **OFFLINE)  # a real process
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def assert_refused(code, err, expected_code, *words):
    """A foreseen refusal: one line, the exit code, no traceback."""
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def load(path):
    return torch.load(path, weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(data_root, tmp_path_factory):
    """12 steps of a small real run, stopped in epoch 2: (folder, output)."""
    run, out = tmp_path_factory.mktemp("trained") / "run", io.StringIO()
    with contextlib.redirect_stdout(out):
        assert vg.main(["--data-dir", data_root, "--out-dir", run, "--max-steps", 12, *SMALL]) == 0
    return run, out.getvalue()


@pytest.fixture
def run_copy(trained, tmp_path):
    return shutil.copytree(trained[0], tmp_path / "run")


def test_train_step_updates_everything_once_with_dropout_and_amp_only_when_asked(monkeypatch):
    torch.manual_seed(0)
    G, D = vg.Generator(), vg.Discriminator()  # the default dropout rate
    images = G(torch.randn(1, 100) * 1e4)  # extreme noise: Tanh still bounds the images
    assert images.shape == (1, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    logits_only = vg.Discriminator()
    with torch.no_grad():
        logits_only.net[-1].bias.fill_(50.0)  # logits: a probability could never exceed 1
        assert logits_only(images).shape == (1, 1) and (logits_only(images) > 1).all()
    opt_G, opt_D = vg.make_optimizer(G), vg.make_optimizer(D)
    before = [p.clone() for p in [*G.parameters(), *D.parameters()]]
    batch_sizes, d_grads, dropped = [], [], []
    D.register_forward_hook(lambda module, inputs, output: batch_sizes.append(len(inputs[0])))
    drop = next(m for m in D.modules() if isinstance(m, torch.nn.Dropout))
    drop.register_forward_hook(
        lambda m, i, out: dropped.append(((out == 0) & (i[0] != 0)).float().mean().item()))
    d_step = opt_D.step
    opt_D.step = lambda: (d_grads.extend(p.grad.clone() for p in D.parameters()), d_step())
    real, z = torch.rand(64, 1, 28, 28) * 2 - 1, torch.randn(64, 100)
    with monkeypatch.context() as patch:  # without --amp, no autocast (torch 2.4 on MPS has none)
        patch.setattr(torch, "autocast", None)
        stats = vg.train_step(G, D, opt_G, opt_D, real, z)
    assert stats.shape == (4,) and torch.isfinite(stats).all()
    assert batch_sizes == [128, 64]  # real and fake together for D, the same fakes again for G
    assert all(torch.equal(g, p.grad) for g, p in zip(d_grads, D.parameters()))  # D untouched
    assert all(not torch.equal(a, b) for a, b in zip(before, [*G.parameters(), *D.parameters()]))
    assert all(p.requires_grad for p in D.parameters())
    rate = vg.build_parser().get_default("d_dropout")  # active in both updates' D passes
    assert drop.p == rate and len(dropped) == 2 and all(abs(x - rate) < 0.05 for x in dropped)
    assert not any(isinstance(m, torch.nn.Dropout) for m in vg.Discriminator(dropout=0).modules())
    assert torch.isfinite(vg.train_step(G, D, opt_G, opt_D, real, z, amp=True)).all()


def test_generator_learns_a_single_pattern():
    torch.manual_seed(0)
    pattern = torch.full((28, 28), -1.0)  # every real image is this one: G's samples must near it
    pattern[6:22, 12:16] = 1.0
    G, D = vg.Generator(hidden=(256, 512)), vg.Discriminator()
    opt_G, opt_D, z = vg.make_optimizer(G), vg.make_optimizer(D), torch.randn(256, 100)
    start = (vg.sample(G, z) - pattern).pow(2).mean().item()
    for _ in range(300):
        vg.train_step(G, D, opt_G, opt_D, pattern.expand(64, 1, 28, 28), torch.randn(64, 100))
    assert (vg.sample(G, z) - pattern).pow(2).mean().item() < 0.25 * start


@pytest.mark.parametrize("decay", [0.9, 0])
def test_the_averaged_generator_is_the_ema_of_g_and_reaches_its_decay(decay):
    torch.manual_seed(0)
    G = vg.Generator(hidden=(8,), batchnorm=True)
    ema, expected = vg.EMA(G, decay), {k: v.detach().clone() for k, v in G.named_parameters()}
    for step in range(1, 101):
        with torch.no_grad():
            for p in G.parameters():
                p.add_(torch.randn_like(p))
            G.net[1].running_mean.add_(1.0)
        ema.update(G)
        weight = min(decay, (1 + step) / (10 + step))  # warming up: 0.18, 0.25, ... 0.9 at 80
        for name, value in G.named_parameters():
            expected[name] = weight * expected[name] + (1 - weight) * value.detach()
    assert weight == decay  # past the warm-up
    averaged = ema.G.state_dict()
    for name, live in G.state_dict().items():  # buffers (BatchNorm's) are copied
        if name not in expected or not decay:  # at decay 0 the average is G itself
            assert torch.equal(averaged[name], live), name
        else:
            assert torch.allclose(averaged[name], expected[name], atol=1e-5), name
            assert not torch.equal(averaged[name], live), name
    assert not any(p.requires_grad for p in ema.G.parameters())


@pytest.mark.parametrize("dataset", ["kmnist", "fake"])
def test_another_dataset_trains_and_fake_on_the_cpu_has_no_device_check(capsys, tmp_path, dataset):
    write_dataset(tmp_path / "data", folder="KMNIST", n_train=128)
    code, out, err = run_main(capsys, "--dataset", dataset, "--data-dir", tmp_path / "data",
                              "--out-dir", tmp_path / "run", "--max-steps", 2, *SMALL)
    assert code == 0, err
    assert f"{dataset}: {128 if dataset == 'kmnist' else 60000} training images" in out
    assert ("no device check" in out) == (dataset == "fake")


def test_missing_incomplete_and_damaged_data_are_told_apart(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    proc = cli("--data-dir", tmp_path / "empty", cwd=tmp_path)  # offline, in a real process
    _, err = proc.communicate(timeout=120)
    raw = tmp_path / "empty" / "MNIST" / "raw"
    assert_refused(proc.returncode, err, 1, f"{raw} lacks train-images-idx3-ubyte,",
                   "t10k-labels-idx1-ubyte", "downloading failed", "--data-dir")
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    raw = write_dataset(tmp_path / "d") / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(vg.GanError, match=f"damaged files in {raw}: shape"):
        vg.load_dataset("mnist", tmp_path / "d")
    images.unlink()
    (raw / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(vg.GanError, match=f"{raw} lacks train-images-idx3-ubyte, t10k-images-"):
        vg.load_dataset("mnist", tmp_path / "d")
    for path in raw.iterdir():  # all four as .gz, which are not the originals
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    images.with_name(images.name + ".gz").write_bytes(gzip.compress(b"not MNIST"))
    with pytest.raises(vg.GanError, match=f"damaged files in {raw}: train-images-idx3-ubyte.gz"):
        vg.load_dataset("mnist", tmp_path / "d")


def test_a_smoke_run_leaves_every_output(trained):
    run, out = trained
    for name in ("samples/epoch_001.png", "samples/step_0000012.png", "losses.png", "metrics.csv",
                 "checkpoint.pt"):
        assert (run / name).stat().st_size > 0, name
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,Loss_D,Loss_G,D(x),D(G(z)),images_per_s"
    assert [row.split(",")[:2] for row in rows[1:]] == [["1", "3"], ["1", "6"], ["2", "9"],
                                                         ["2", "12"]]
    assert "[2/3][4/8] step 12  Loss_D" in out and "epoch 1/3 done: mean Loss_D" in out
    assert "device cpu" in out and "512 training images" in out and "epoch 2/3 stopped" in out
    checkpoint = load(run / "checkpoint.pt")
    assert checkpoint["step"] == 12 and checkpoint["epoch"] == 1 and checkpoint["done"] == 4 * 64
    assert not {"device", "amp", "eval", "max_steps", "out_dir"} & checkpoint["args"].keys()
    torch.manual_seed(42)  # the weights moved away from their start (G is built first)
    initial = vg.Generator().state_dict()
    assert all(not torch.equal(initial[k], checkpoint["G"][k]) for k in initial)
    fig = vg.plot_losses(checkpoint["metrics"], 8, run / "again.png")  # where D guesses: dashed
    dashed = [sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--")
              for ax in fig.axes]
    assert dashed == [pytest.approx([math.log(2), 2 * math.log(2)]), [0.5, 0.5]]


def test_resume_keeps_the_run_and_lets_length_lr_and_logging_change(capsys, run_copy):
    before = (run_copy / "checkpoint.pt").read_bytes()
    for flags, words in ((["--g-activation", "relu"], "the run has --g-activation leakyrelu"),
                         (["--dataset", "fake"], "--dataset mnist, not fake"),
                         (["--batch-size", 128], "--batch-size 64, not 128"),
                         (["--seed", 1], "--seed 42, not 1"),
                         (["--config", "minimal"], "the run has --d-dropout 0.3, not 0.0")):
        code, _, err = run_main(capsys, "--resume", run_copy, *flags)
        assert_refused(code, err, 1, words, "drop the flag (a run keeps it)")
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    code, _, err = run_main(capsys, "--resume", run_copy / "checkpoint.pt", "--lr", 1e-3,
                            "--log-every", 5, "--max-steps", 14)
    assert code == 0, err
    checkpoint = load(run_copy / "checkpoint.pt")
    assert checkpoint["opt_G"]["param_groups"][0]["lr"] == 1e-3 and checkpoint["args"]["lr"] == 1e-3
    assert checkpoint["args"]["batch_size"] == 64 and checkpoint["step"] == 14
    moved = run_copy.rename(run_copy.parent / "moved")  # a moved run resumes where it is now
    code, out, err = run_main(capsys, "--resume", moved)  # --max-steps is not kept: on to 3 epochs
    assert code == 0 and f"run folder {moved}" in out and "done: 24 steps" in out, err
    code, out, err = run_main(capsys, "--resume", moved)
    assert code == 0 and "nothing to train" in out, err
    before = (moved / "checkpoint.pt").read_bytes()
    code, _, err = run_main(capsys, "--resume", moved, "--lr", 1e30, "--epochs", 4)
    assert_refused(code, err, 1, "training diverged", "smaller --lr")
    assert (moved / "checkpoint.pt").read_bytes() == before  # nothing saved


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_request_saves_and_resume_ends_where_an_unstopped_run_does(
        capsys, data_root, tmp_path, sig, expected):
    run, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["--data-dir", data_root, *SMALL, "--log-every", 1]
    proc = cli(*flags, "--out-dir", run, "--epochs", 1000)
    next(line for line in proc.stdout if "Loss_D" in line)  # training is under way
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == expected, err
    assert f"--resume {run}" in out and "Traceback" not in err
    step = load(run / "checkpoint.pt")["step"]
    grid = f"step_{step:07d}.png" if step % 8 else f"epoch_{step // 8:03d}.png"
    assert step > 0 and (run / "samples" / grid).exists()  # a grid of the last step
    assert run_main(capsys, "--resume", run, "--max-steps", step + 3, "--epochs", 1000)[0] == 0
    assert run_main(capsys, *flags, "--out-dir", straight, "--max-steps", step + 3,
                    "--epochs", 1000)[0] == 0
    a, b = load(run / "checkpoint.pt"), load(straight / "checkpoint.pt")
    assert a["step"] == step + 3 and all(same_weights(a[k], b[k]) for k in ("G", "D", "G_avg"))
    losses = [[[row[k] for k in ("step", *vg.STATS)] for row in c["metrics"]] for c in (a, b)]
    assert losses[0] == losses[1]


def test_a_busy_or_unwritable_place_or_a_full_disk_loses_nothing(capsys, data_root, trained,
                                                                  run_copy, tmp_path, monkeypatch):
    before = (run_copy / "checkpoint.pt").read_bytes()
    code, _, err = run_main(capsys, "--data-dir", data_root, "--out-dir", run_copy, *SMALL)
    assert_refused(code, err, 1, "already holds a run", f"--resume {run_copy}")
    assert (run_copy / "checkpoint.pt").read_bytes() == before and not list(run_copy.glob("*.tmp"))
    flags = ["--data-dir", data_root, "--out-dir", run_copy.parent / "new", "--max-steps", 2,
             *SMALL]
    procs = [cli(*flags) for _ in range(2)]  # two new runs at once in one folder
    results = sorted((proc.wait(timeout=120), proc.stderr.read()) for proc in procs)
    assert [code for code, _ in results] == [0, 1], results
    assert_refused(*results[1], 1, "already holds a run")
    for out in (tmp_path / "missing" / "x.pt", tmp_path / "missing" / "x.png"):  # torch's, PIL's
        code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", trained[0], "--out", out)
        assert_refused(code, err, 1, f"cannot write {out} (No such file or directory)")

    def failing(error):
        def fail(*args, **kwargs):  # stands in for torch.save or Path.unlink
            raise OSError(error, os.strerror(error))
        return fail

    before = (run_copy / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(torch, "save", failing(errno.ENOSPC))
    with pytest.raises(OSError, match="No space left"):  # unforeseen here: Python's traceback
        vg.main(["--resume", str(run_copy), "--max-steps", 13])
    assert (run_copy / "checkpoint.pt").read_bytes() == before and not list(run_copy.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", failing(errno.EROFS))
    capsys.readouterr()
    code, out, err = run_main(capsys, "--data-dir", data_root, "--out-dir", tmp_path / "ro", *SMALL)
    assert_refused(code, err, 1, f"cannot write in {tmp_path / 'ro'}", "read-only file system")
    assert "Loss_D" not in out  # refused before any training
    monkeypatch.setattr(Path, "unlink", failing(errno.EPERM))
    with pytest.raises(OSError, match="Read-only"):  # the first error, not the clean-up's
        vg.write_atomically(tmp_path / "x.pt", lambda f: torch.save(1, f))


@pytest.mark.parametrize("name", list(vg.CONFIGS))
def test_each_config_trains_resumes_and_generates_with_no_other_flag(capsys, data_root, tmp_path,
                                                                     name):
    run = tmp_path / "run"
    code, _, err = run_main(capsys, "--config", name, "--latent-dim", 32, "--data-dir", data_root,
                            "--out-dir", run, "--max-steps", 2, "--device", "cpu")  # typed wins
    assert code == 0, err
    code, _, err = run_main(capsys, "--resume", run, "--max-steps", 3)  # the run's flags return
    assert code == 0, err
    saved = load(run / "checkpoint.pt")["args"]
    assert saved == {**saved, **vg.CONFIGS[name], "latent_dim": 32}
    code, _, err = run_main(capsys, "--generate", 1, "--checkpoint", run, "--out", run / "1.pt")
    assert code == 0 and load(run / "1.pt").shape == (1, 1, 28, 28), err  # BatchNorm: eval mode


def test_generate_a_grid_or_a_tensor_from_the_averaged_generator(capsys, trained, tmp_path):
    run, _ = trained
    for name, source, seed in (("a", run / "checkpoint.pt", 1), ("b", run, 1), ("c", run, 2)):
        code, out, err = run_main(capsys, "--generate", 10, "--checkpoint", source, "--seed", seed,
                                  "--out", tmp_path / f"{name}.pt")
        assert code == 0 and f"wrote 10 images to {tmp_path / name}.pt" in out, err
    a, b, c = (load(tmp_path / f"{name}.pt") for name in "abc")
    assert a.shape == (10, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)  # the averaged G; seeds differ
    G, z = vg.Generator(), torch.randn(10, 100, generator=torch.Generator().manual_seed(1))
    G.load_state_dict(load(run / "checkpoint.pt")["G_avg"])
    assert torch.equal(a, vg.sample(G, z))  # the averaged G, from noise drawn on the CPU
    assert run_main(capsys, "--generate", 16, "--checkpoint", run)[0] == 0
    from PIL import Image
    assert Image.open(run / "generated.png").size == (4 * 30 + 2, 4 * 30 + 2)  # square, beside
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", run, "--g-hidden", 64)
    assert_refused(code, err, 1, "the run has --g-hidden [256, 512, 1024], not [64]")
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", run, "--out", run / "x.txt")
    assert_refused(code, err, 1, "cannot write", "unknown file extension")


class Payload:
    def __reduce__(self):  # unpickling this would call Path.touch("pwned")
        return (Path.touch, (Path("pwned"),))


def test_files_that_are_not_our_checkpoints_are_refused_unread(capsys, trained, tmp_path,
                                                               monkeypatch):
    run, evil = trained[0], tmp_path / "evil.pt"
    monkeypatch.chdir(tmp_path)
    torch.save({"args": {}, "G_avg": Payload()}, evil)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000])
    cases = ((evil, "damaged or not a vanilla_gan"), (tmp_path / "truncated.pt", "damaged"),
             (tmp_path / "foreign.pt", "is not a vanilla_gan checkpoint"),
             (run / "metrics.csv", "not a vanilla_gan checkpoint"),
             (tmp_path / "missing.pt", "no checkpoint at"))
    for path, words in cases:
        for flags in (["--generate", 4, "--checkpoint", path], ["--resume", path]):
            assert_refused(*run_main(capsys, *flags)[::2], 1, words)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("args, flag", [
    *[([f"{flag}={value}"], flag) for flag in ("--epochs", "--batch-size", "--lr", "--max-steps",
                                              "--latent-dim", "--generate")
      for value in ("0", "-1", "abc")],
    (["--lr", "nan"], "--lr"), (["--d-dropout", "1"], "--d-dropout"),
    (["--device", "tpu"], "cuda:N"), (["--config", "huge"], "--config"),
    (["--epcohs", "1"], "--epcohs"), (["--generate", "4"], "--checkpoint"),
    (["--checkpoint", "runs/x"], "--generate"), (["--out", "x.png"], "--generate"),
    (["--generate", "100", "--checkpoint", "x", "--eval"], "--eval"),
    (["--generate", "4", "--checkpoint", "x", "--resume", "x"], "--resume"),
    (["--dataset", "fake", "--eval"], "--eval")])
def test_a_bad_flag_gets_argparse_usage_and_exit_2(capsys, args, flag):
    code, _, err = run_main(capsys, *args)
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("usage: vanilla_gan.py"), err
    assert last.startswith("vanilla_gan.py: error: ") and flag in last, last


def test_help_and_foreseen_refusals_in_one_line(capsys, data_root, tmp_path):
    assert vg.main(["--help"]) == 0  # returned, not raised: a notebook survives it
    text = " ".join(capsys.readouterr().out.split())
    assert "--checkpoint RUN for --generate" in text and "cuda:N or mps" in text
    assert "(None: generated.png beside the checkpoint) (default: None)" in text
    (tmp_path / "file").write_text("")
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    cases = ((["--device", device], f"--device {device}: no such device"),
             (["--data-dir", tmp_path / "file"], "not a directory"),
             (["--data-dir", data_root, "--batch-size", 513], "exceeds the 512 images"),
             (["--data-dir", data_root, "--out-dir", tmp_path / "file" / "run"], "cannot write in"))
    for args, words in cases:
        assert_refused(*run_main(capsys, *args, "--max-steps", 1)[::2], 1, words)


def test_the_quality_report_and_eval_after_training_and_on_generate(capsys, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 8, generator=gen).double() @ torch.randn(8, 8, generator=gen).double()
    b = torch.randn(3000, 8, generator=gen).double() * 2 + 1
    assert abs(vg.frechet_distance(a, a)) < 1e-6
    assert vg.frechet_distance(a, b) == pytest.approx(vg.frechet_distance(b, a), rel=1e-6)
    x, y = a[:, :1], b[:, :1]  # in one dimension: (mu_x - mu_y)^2 + (sigma_x - sigma_y)^2
    expected = (x.mean() - y.mean()) ** 2 + (x.std() - y.std()) ** 2
    assert vg.frechet_distance(x, y) == pytest.approx(expected.item())
    root = write_dataset(tmp_path / "data", n_train=2000, n_test=500)
    images, labels = vg.load_dataset("mnist", root)
    real, cpu = vg.to_unit_range(images[1000:]), torch.device("cpu")  # as a perfect G draws
    fid_real, shares_real = vg.report_quality(real, "mnist", root, cpu)
    fid_noise, _ = vg.report_quality(torch.rand(500, 1, 28, 28) * 2 - 1, "mnist", root, cpu)
    fid_collapsed, shares = vg.report_quality(real[labels[1000:] == 3], "mnist", root, cpu)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("quality of 100 samples: FID") and last.endswith("class 0 at 0.0%")
    assert "too few samples to compare" in last
    assert fid_real * 10 < fid_noise and fid_real * 10 < fid_collapsed
    assert shares_real.min() > 0.09 and shares[3] == 1.0 and shares.sum() == 1.0
    run = tmp_path / "run"  # --eval after training, on --generate, and on a finished run
    code, out, err = run_main(capsys, "--data-dir", root, "--out-dir", run, "--eval",
                              "--max-steps", 8, *SMALL)
    assert code == 0 and "quality of 10000 samples: FID" in out and "too few" not in out, err
    monkeypatch.chdir((tmp_path / "elsewhere").mkdir() or tmp_path / "elsewhere")  # no data/
    code, out, err = run_main(capsys, "--generate", 200, "--checkpoint", run, "--eval")
    assert code == 0 and "quality of 200 samples: FID" in out, err  # the run's data folder
    (tmp_path / "file").write_text("")
    code, _, err = run_main(capsys, "--generate", 200, "--checkpoint", run, "--eval",
                            "--data-dir", tmp_path / "file")
    assert_refused(code, err, 1, "not a directory")  # a typed --data-dir wins
    code, out, err = run_main(capsys, "--resume", run, "--max-steps", 8, "--eval")
    assert code == 0 and "nothing to train" in out and "quality of 10000 samples" in out, err


@pytest.mark.parametrize("config, how", [(None, "nan"), *[(config, how) for how in (
    "rounding", "wrong layer") for config in (None, *vg.CONFIGS)]])
def test_device_check_passes_rounding_and_fails_a_wrong_layer_or_nan(monkeypatch, capsys, config,
                                                                     how):
    flags = ["--dataset", "fake", "--batch-size", "16"] + (["--config", config] if config else [])
    args, real_step, calls = vg.parse_args(flags)[0], vg.train_step, []

    def device_side(G, D, opt_G, opt_D, real, z):
        calls.append(1)
        on_device = len(calls) <= 5  # the device's 5 batches come first, then the CPU's
        if on_device and how == "rounding":  # ten times float32's rounding differences
            noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(len(calls)))
            real = real * (1 + 1e-6 * noise)
        if on_device and how == "wrong layer":  # one kernel off by 0.5%
            D.net[1].register_forward_hook(lambda module, inputs, out: out * 1.005)
        stats = real_step(G, D, opt_G, opt_D, real, z)
        if on_device and how == "nan":  # G's update leaves one weight NaN
            G.net[0].weight.data[0, 0] = math.nan
        return stats

    monkeypatch.setattr(vg, "train_step", device_side)
    if how == "rounding":
        vg.device_check(args, torch.device("cpu"))
        assert "device check passed: cpu matches the CPU" in capsys.readouterr().out
    else:
        with pytest.raises(vg.GanError, match="device check failed: cpu differs from the CPU"):
            vg.device_check(args, torch.device("cpu"))


def test_the_readme_sets_up_a_venv_shell_and_its_notebook_block_runs_twice(tmp_path):
    """The set-up activates the venv; the notebook block runs twice on MNIST or stand-ins."""
    readme = (SCRIPT.parent / "README.md").read_text()
    setup = next(line for line in readme.splitlines() if line.startswith("    python3 -m venv"))
    assert setup.index(". .venv/bin/activate") < setup.index("python vanilla_gan.py")
    block = readme.split("## Use it from a notebook")[1].split("```python\n")[1].split("```")[0]
    if os.environ.get("MNIST_DIR"):  # the real digits
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "MNIST").symlink_to(Path(os.environ["MNIST_DIR"]).resolve() / "MNIST")
    else:
        write_dataset(tmp_path / "data", n_train=2048)
    here = f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
    (tmp_path / "notebook.py").write_text(here + block + "\nassert code == 0\n")
    for _ in range(2):
        proc = subprocess.run([sys.executable, "notebook.py"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = list((tmp_path / "runs").glob("*/checkpoint.pt"))
    assert (tmp_path / "notebook_grid.png").is_file() and len(runs) == 2


@cuda
def test_cuda_device_check_exact_resume_amp_and_tf32_restored(capsys, data_root, tmp_path):
    torch.set_float32_matmul_precision("highest")
    code, out, err = run_main(capsys, "--dataset", "fake", "--device", "cuda", "--out-dir",
                              tmp_path / "fake", "--max-steps", 30)
    assert code == 0 and "device check passed: cuda matches the CPU" in out, err
    assert torch.get_float32_matmul_precision() == "highest"  # TF32 off again after main()
    flags = ["--data-dir", data_root, "--device", "cuda", "--batch-size", 64, "--epochs", 3]
    for name, steps, *extra in (("a", 20), ("b", 12), ("amp", 5, "--amp")):
        code = run_main(capsys, *flags, "--out-dir", tmp_path / name, "--max-steps", steps, *extra)
        assert code[0] == 0, code
    code = run_main(capsys, "--resume", tmp_path / "b", "--device", "cuda", "--max-steps", 20)
    a, b = load(tmp_path / "a" / "checkpoint.pt"), load(tmp_path / "b" / "checkpoint.pt")
    assert code[0] == 0 and all(same_weights(a[k], b[k]) for k in ("G", "D", "G_avg"))

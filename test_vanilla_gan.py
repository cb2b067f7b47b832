"""Tests for vanilla_gan.py, on small MNIST-format files that torchvision reads. MNIST_DIR, a
folder holding MNIST/raw/, gives the README's notebook block the real digits."""
import contextlib
import copy
import gzip
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import vanilla_gan as vg

SCRIPT = Path(__file__).resolve().parent / "vanilla_gan.py"
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = ["--batch-size", 64, "--log-every", 3, "--device", "cpu", "--epochs", 3]  # 8 steps/epoch
bce = torch.nn.functional.binary_cross_entropy_with_logits


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
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        labels = torch.arange(n) % 10
        for i, k in enumerate(labels.tolist()):
            row = 2 + k // 5 * 13 + torch.randint(0, 3, (1,), generator=gen).item()
            column = 1 + k % 5 * 5
            images[i, row:row + 8, column:column + 4] = torch.randint(180, 256, (1,), generator=gen)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8), 2049)
    return Path(root)


def run_main(capsys, *args):
    return (vg.main(list(args)), *capsys.readouterr())


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
    """12 steps of a small real run with --amp, stopped in epoch 2, outside the main thread as
    Gradio runs it (signals cannot be caught there): (folder, output)."""
    run, out, codes = tmp_path_factory.mktemp("trained") / "run", io.StringIO(), []
    args = ["--data-dir", data_root, "--out-dir", run, "--max-steps", 12, "--amp", *SMALL]
    with contextlib.redirect_stdout(out):
        thread = threading.Thread(target=lambda: codes.append(vg.main(args)))
        thread.start()
        thread.join()
    assert codes == [0]
    return run, out.getvalue()


@pytest.fixture
def run_copy(trained, tmp_path):
    return shutil.copytree(trained[0], tmp_path / "run")


def test_train_step_is_the_textbook_step(monkeypatch):
    """Two steps against the textbook's losses and two D passes, gradient by gradient."""
    torch.manual_seed(0)
    G, D = vg.Generator(hidden=(32,)), vg.Discriminator(hidden=(32,), dropout=0)
    opt_G, opt_D = vg.make_optimizer(G), vg.make_optimizer(D)
    seen = []  # at each optimiser step: which, its gradients, D's weights
    for name, opt, net in (("D", opt_D, D), ("G", opt_G, G)):
        def record(step=opt.step, name=name, net=net):
            grads = [p.grad.clone() for p in net.parameters()]
            seen.append((name, grads, copy.deepcopy(D)))
            step()
        opt.step = record
    monkeypatch.setattr(torch, "autocast", None)  # without --amp, no autocast at all
    for _ in range(2):
        real, z = torch.rand(16, 1, 28, 28) * 2 - 1, torch.randn(16, 100)
        G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
        seen.clear()
        stats = vg.train_step(G, D, opt_G, opt_D, real, z)
        assert [name for name, *_ in seen] == ["D", "G"]
        fake = G0(z)
        real_logits, fake_logits = D0(real), D0(fake.detach())
        ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
        loss_D = bce(real_logits, ones) + bce(fake_logits, zeros)  # D: real 1, fake 0
        updated_D = seen[1][2]
        loss_G = bce(updated_D(fake), ones)  # G: -log D(G(z)), D after its update
        grads_D = torch.autograd.grad(loss_D, list(D0.parameters()))
        grads_G = torch.autograd.grad(loss_G, list(G0.parameters()))
        torch.testing.assert_close(seen[0][1], list(grads_D), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(seen[1][1], list(grads_G), rtol=1e-4, atol=1e-7)
        expected = [loss_D, loss_G, real_logits.sigmoid().mean(), fake_logits.sigmoid().mean()]
        torch.testing.assert_close(stats, torch.stack(expected).detach())
        assert all(p.requires_grad for p in D.parameters())
    monkeypatch.undo()
    assert torch.isfinite(vg.train_step(G, D, opt_G, opt_D, real, z, amp=True)).all()
    with torch.no_grad():  # logits: a probability could never exceed 1
        [m for m in D.modules() if isinstance(m, torch.nn.Linear)][-1].bias.fill_(50.0)
        assert (D(real) > 1).all()


def test_tanh_images_dropout_in_both_d_passes_and_sampling_in_eval_mode():
    torch.manual_seed(0)
    G, D = vg.Generator(), vg.Discriminator()  # the defaults: dropout 0.3
    assert G(torch.randn(1, 100) * 1e4).abs().max() <= 1  # extreme noise: Tanh still bounds it
    dropped = []
    drop = next(m for m in D.modules() if isinstance(m, torch.nn.Dropout))
    drop.register_forward_hook(
        lambda m, i, out: dropped.append(((out == 0) & (i[0] != 0)).float().mean().item()))
    opt_G, opt_D = vg.make_optimizer(G), vg.make_optimizer(D)
    vg.train_step(G, D, opt_G, opt_D, torch.rand(64, 1, 28, 28) * 2 - 1, torch.randn(64, 100))
    assert len(dropped) == 2 and all(abs(x - 0.3) < 0.05 for x in dropped)
    G.net.insert(1, torch.nn.BatchNorm1d(256))  # batch statistics would couple the images
    z = torch.randn(16, 100)  # sample(): eval mode, and G's mode back after it
    assert torch.allclose(vg.sample(G, z)[:1], vg.sample(G, z[:1]), atol=1e-6) and G.training


def test_train_epoch_feeds_each_image_once_scaled_to_tanh_range_with_fresh_noise(monkeypatch):
    pixels = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    pixels[0], pixels[1] = 0, 255
    G = vg.Generator(hidden=(8,))
    ema, seen = vg.EMA(G), []

    def fake_step(G, D, opt_G, opt_D, real, z, amp):
        seen.append((real, z))
        return torch.zeros(4)

    monkeypatch.setattr(vg, "train_step", fake_step)
    order = torch.randperm(100)
    steps = list(vg.train_epoch(G, None, None, None, pixels, 32, order, ema=ema))
    assert len(steps) == 3 and ema.steps == 3  # the last 4 images wait; the EMA each step
    real = torch.cat([real for real, _ in seen])
    assert torch.equal(real, pixels[order[:96]].float() / 127.5 - 1)  # 0..255 -> [-1, 1]
    z = torch.stack([z for _, z in seen])
    assert z.shape == (3, 32, 100) and abs(z.std() - 1) < 0.05 and not torch.equal(z[0], z[1])


@pytest.mark.parametrize("decay", [0.9, 0])
def test_the_averaged_generator_is_the_ema_of_g_after_a_warm_up(decay):
    torch.manual_seed(0)
    G = vg.Generator(hidden=(8,))
    G.net.insert(1, torch.nn.BatchNorm1d(8))
    ema = vg.EMA(G, decay)
    expected = {k: v.detach().clone() for k, v in G.named_parameters()}
    for step in range(1, 101):
        with torch.no_grad():
            for p in G.parameters():
                p.add_(torch.randn_like(p))
            G.net[1].running_mean.add_(1.0)
        ema.update(G)
        weight = min(decay, (1 + step) / (10 + step))  # warming up: 0.18, 0.25, ... 0.9 at 80
        for name, value in G.named_parameters():
            expected[name] = weight * expected[name] + (1 - weight) * value.detach()
    for name, live in G.named_parameters():
        averaged = ema.G.state_dict()[name]
        assert torch.allclose(averaged, expected[name], atol=1e-5), name
        assert torch.equal(averaged, live) == (decay == 0), name  # decay 0: G itself
    assert torch.equal(ema.G.net[1].running_mean, G.net[1].running_mean)  # buffers: copied
    assert not any(p.requires_grad for p in ema.G.parameters())


def test_frechet_distance_is_the_matrix_square_root_formula():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 8, generator=gen).double() @ torch.randn(8, 8, generator=gen).double()
    b = torch.randn(3000, 8, generator=gen).double() @ torch.randn(8, 8, generator=gen).double()

    def sqrtm(c):  # of a symmetric positive semi-definite matrix
        values, vectors = torch.linalg.eigh(c)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root = sqrtm(cov_a)
    cross = sqrtm(root @ cov_b @ root).trace()
    expected = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    assert vg.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-8)
    assert abs(vg.frechet_distance(a, a)) < 1e-6


def test_the_quality_report_and_eval_after_training_and_on_generate(capsys, tmp_path, monkeypatch):
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
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no data/ here
    code, out, err = run_main(capsys, "--generate", 200, "--checkpoint", run, "--eval")
    assert code == 0 and "quality of 200 samples: FID" in out, err  # the run's data folder
    code, out, err = run_main(capsys, "--resume", run, "--max-steps", 8, "--eval")
    assert code == 0 and "nothing to train" in out and "quality of 10000 samples" in out, err


def test_missing_incomplete_corrupt_and_damaged_data_are_told_apart(tmp_path, monkeypatch):
    proc = cli("--data-dir", tmp_path / "typo" / "data", cwd=tmp_path)  # offline, a real process
    _, err = proc.communicate(timeout=120)
    raw = tmp_path / "typo" / "data" / "MNIST" / "raw"
    assert_refused(proc.returncode, err, 1, f"{raw} lacks train-images-idx3-ubyte,",
                   "t10k-labels-idx1-ubyte", "downloading failed", "--data-dir")
    assert not (tmp_path / "typo").exists() and not (tmp_path / "runs").exists()  # no folder
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    raw = write_dataset(tmp_path / "d") / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    original = images.read_bytes()
    for content in (original[:5000], b"<html><body>404 Not Found</body></html>", b""):
        images.write_bytes(content)  # truncated, an error page saved as the file, empty
        with pytest.raises(vg.GanError, match=f"damaged files in {raw}: "):
            vg.load_dataset("mnist", tmp_path / "d")
    images.write_bytes(original)
    for path in raw.iterdir():  # all four as .gz, which are not the originals
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    with pytest.raises(vg.GanError, match=f"damaged files in {raw}: train-images-idx3-ubyte.gz"):
        vg.load_dataset("mnist", tmp_path / "d")
    for path in list(raw.glob("t*-images*")):  # two of the four files
        path.unlink()
    with pytest.raises(vg.GanError, match=f"{raw} lacks train-images-idx3-ubyte, t10k-images-"):
        vg.load_dataset("mnist", tmp_path / "d")


def test_a_smoke_run_leaves_every_output(trained, tmp_path):
    run, out = trained
    for name in ("samples/epoch_001.png", "samples/step_0000012.png", "losses.png",
                 "metrics.csv", "checkpoint.pt", "flags.json"):
        assert (run / name).stat().st_size > 0, name
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,Loss_D,Loss_G,D(x),D(G(z)),images_per_s"
    assert [row.split(",")[:2] for row in rows[1:]] == [["1", "3"], ["1", "6"], ["2", "9"],
                                                         ["2", "12"]]
    assert "[2/3][4/8] step 12  Loss_D" in out and "epoch 1/3 done: mean Loss_D" in out
    for words in ("device cpu  torch", "amp True", "512 training images", "epoch 2/3 stopped"):
        assert words in out, words
    checkpoint = load(run / "checkpoint.pt")
    assert checkpoint["step"] == 12 and checkpoint["epoch"] == 1 and checkpoint["done"] == 4 * 64
    order = checkpoint["order"]  # shuffled each epoch
    assert torch.equal(order.sort().values, torch.arange(512)) and order[0] != 0
    flags = checkpoint["args"]
    assert not {"device", "amp", "eval", "max_steps", "out_dir"} & flags.keys()
    assert json.loads((run / "flags.json").read_text()) == flags and json.dumps(flags) in out
    torch.manual_seed(42)  # the weights moved away from their start (G is built first)
    initial = vg.Generator().state_dict()
    assert all(not torch.equal(initial[k], checkpoint["G"][k]) for k in initial)
    assert not same_weights(checkpoint["G"], checkpoint["G_avg"])  # the EMA, not G
    G = vg.load_generator(run)  # the last grid: the averaged G on the fixed noise
    vg.save_grid(vg.sample(G, checkpoint["fixed_noise"]), tmp_path / "grid.png")
    assert Image.open(run / "samples/step_0000012.png").tobytes() == \
        Image.open(tmp_path / "grid.png").tobytes()


def test_resume_keeps_the_run_and_lets_length_lr_and_logging_change(capsys, run_copy,
                                                                    monkeypatch):
    before = (run_copy / "checkpoint.pt").read_bytes()
    for flags, words in ((["--d-dropout", 0.5], "the run has --d-dropout 0.3, not 0.5"),
                         (["--dataset", "fake"], "--dataset mnist, not fake"),
                         (["--g-hidden", 64, 64], "--g-hidden 256 512 1024, not 64 64"),
                         (["--seed", 1], "--seed 42, not 1")):
        code, _, err = run_main(capsys, "--resume", run_copy, *flags)
        assert_refused(code, err, 1, words, "it keeps them")
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    real_plot = vg.plot_losses

    def interrupted_plot(*args):  # Ctrl-C while the plot is drawn, after the last save
        os.kill(os.getpid(), signal.SIGINT)
        return real_plot(*args)

    monkeypatch.setattr(vg, "plot_losses", interrupted_plot)
    handler = signal.getsignal(signal.SIGINT)  # (a background job's ignores SIGINT)
    code, out, err = run_main(capsys, "--resume", run_copy / "checkpoint.pt", "--lr", 1e-3,
                              "--log-every", 5, "--max-steps", 14)
    assert code == 130 and f"To resume: python vanilla_gan.py --resume {run_copy}" in out, err
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are put back
    monkeypatch.undo()
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


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                           (signal.SIGKILL, -9)])
def test_a_stopped_run_resumes_where_an_unstopped_one_ends_and_one_trainer_holds_a_folder(
        capsys, data_root, tmp_path, sig, expected):
    run, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["--data-dir", data_root, *SMALL, "--log-every", 1]
    proc = cli(*flags, "--out-dir", run, "--epochs", 1000)
    next(line for line in proc.stdout if "Loss_D" in line)  # training is under way
    for other in (["--resume", run], [*flags, "--out-dir", run]):  # a second trainer there
        assert_refused(*run_main(capsys, *other)[::2], 1, f"{run} is in use by another trainer")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == expected, err
    step = load(run / "checkpoint.pt")["step"]
    if sig != signal.SIGKILL:
        assert f"--resume {run}" in out and "Traceback" not in err
        grid = f"step_{step:07d}.png" if step % 8 else f"epoch_{step // 8:03d}.png"
        assert step > 0 and (run / "samples" / grid).exists()  # a grid of the last step
    assert run_main(capsys, "--resume", run, "--max-steps", step + 3, "--epochs", 1000)[0] == 0
    assert run_main(capsys, *flags, "--out-dir", straight, "--max-steps", step + 3,
                    "--epochs", 1000)[0] == 0
    a, b = load(run / "checkpoint.pt"), load(straight / "checkpoint.pt")
    assert a["step"] == step + 3
    assert all(same_weights(a[k], b[k]) for k in ("G", "D", "G_avg"))
    assert torch.equal(a["fixed_noise"], b["fixed_noise"])
    losses = [[[row[k] for k in ("step", *vg.STATS)] for row in c["metrics"]] for c in (a, b)]
    assert losses[0] == losses[1]


def test_a_busy_or_unwritable_place_or_a_full_disk_loses_nothing(capsys, data_root, trained,
                                                                  run_copy, tmp_path):
    before = (run_copy / "checkpoint.pt").read_bytes()
    code, _, err = run_main(capsys, "--data-dir", data_root, "--out-dir", run_copy, *SMALL)
    assert_refused(code, err, 1, "already holds a run", f"--resume {run_copy}")
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    new = tmp_path / "new"
    new.mkdir()
    for folder, name, *flags in ((run_copy, "metrics.csv", "--resume", run_copy),
                                 (new, "checkpoint.pt", "--data-dir", data_root, "--out-dir", new)):
        tmp = folder / f"{name}.{os.getpid()}.tmp"
        tmp.symlink_to("/dev/full")  # the kernel's own "No space left on device"
        code, out, err = run_main(capsys, *flags, *SMALL)
        assert_refused(code, err, 1, f"cannot write {folder / name}", "no space left")
        assert "Loss_D" not in out and not tmp.exists()  # refused before training
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    for out in (tmp_path / "missing" / "x.pt", tmp_path / "missing" / "x.png"):  # torch's, PIL's
        code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", trained[0], "--out", out)
        assert_refused(code, err, 1, f"cannot write {out}", "No such file or directory")


def test_generate_a_grid_or_a_tensor_from_the_averaged_generator(capsys, trained, tmp_path):
    run, _ = trained
    for name, source, seed in (("a", run / "checkpoint.pt", 1), ("b", run, 1), ("c", run, 2)):
        code, out, err = run_main(capsys, "--generate", 10, "--checkpoint", source, "--seed", seed,
                                  "--out", tmp_path / f"{name}.pt")
        assert code == 0 and f"wrote 10 images to {tmp_path / name}.pt" in out, err
        assert "the averaged G at step 12 (epochs done: 1)" in out
    a, b, c = (load(tmp_path / f"{name}.pt") for name in "abc")
    assert a.shape == (10, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeds differ
    G = vg.load_generator(run)  # the averaged G, in eval mode, from noise drawn on the CPU
    z = torch.randn(10, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, vg.sample(G, z)) and not G.training and not G.net[0].weight.requires_grad
    assert run_main(capsys, "--generate", 16, "--checkpoint", run)[0] == 0
    assert Image.open(run / "generated.png").size == (4 * 30 + 2, 4 * 30 + 2)  # square, beside
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", run, "--g-hidden", 64)
    assert_refused(code, err, 1, "the run has --g-hidden 256 512 1024, not 64")
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", run, "--out", tmp_path / "x")
    assert_refused(code, err, 1, "x: end it in .png, .jpg, ... (or .pt for a tensor)")
    before = [path.read_bytes() for path in sorted(run.rglob("*.*"))]
    source = shutil.copy(run / "checkpoint.pt", tmp_path / "copy.pt")  # a copy elsewhere too
    for own in ("checkpoint.pt", "losses.png", "metrics.csv", "flags.json", "samples/x.png"):
        code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", source, "--out", run / own)
        assert_refused(code, err, 1, "is for a run's own files")
    assert [path.read_bytes() for path in sorted(run.rglob("*.*"))] == before
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", run, "--epochs", 3,
                            "--lr", 1, "--max-steps", 5, "--out-dir", tmp_path)
    assert code == 2 and "--generate takes no --epochs, --max-steps, --lr, --out-dir" in err


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
        with pytest.raises(vg.GanError, match=words):
            vg.load_generator(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("args, flag", [
    ("--epochs 0", "--epochs"), ("--lr nan", "--lr"), ("--batch-size x", "--batch"),
    ("--d-dropout 1", "--d-dropout"), ("--device tpu", "cuda:N"),
    ("--generate 4", "--checkpoint"), ("--out x.png", "--generate"),
    ("--generate 100 --checkpoint x --eval", "129"), ("--generate 4 --checkpoint x --resume x",
                                                      "--resume"),
    ("--dataset fake --eval", "--eval"), ("--image-size 32", "--dataset folder"),
    ("--seed 99999999999999999999", "--seed")])
def test_a_bad_flag_gets_argparse_usage_and_exit_2(capsys, args, flag):
    code, _, err = run_main(capsys, *args.split())
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("usage: vanilla_gan.py"), err
    assert last.startswith("vanilla_gan.py: error: ") and flag in last, last


def test_help_and_foreseen_refusals_in_one_line(capsys, data_root, tmp_path, monkeypatch):
    assert vg.main(["--help"]) == 0  # returned, not raised: a notebook survives it
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--checkpoint RUN for --generate: a run folder", "cuda:N or mps",
                  "--epochs N passes over the training set (default: 50)"):
        assert words in text and "(default: None)" not in text, words
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    cases = ((["--device", device], f"no {device} here: torch {torch.__version__}"),
             (["--dataset", "fake", "--device", "cpu"], "not the CPU itself: torch"),
             (["--data-dir", tmp_path / "file"], "not a directory"),
             (["--data-dir", data_root, "--batch-size", 513], "exceeds the 512 images"),
             (["--data-dir", data_root, "--out-dir", tmp_path / "file" / "run"], "cannot write in"))
    for args, words in cases:
        assert_refused(*run_main(capsys, *args, "--max-steps", 1)[::2], 1, words)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made
    for _ in range(3):  # runs started in the same second get folders of their own
        vg.make_run_folder(None)
    assert len(list((tmp_path / "runs").iterdir())) == 3


@pytest.mark.parametrize("how", ["rounding", "wrong layer", "wrong update", "nan"])
def test_device_check_passes_rounding_and_fails_a_wrong_layer_or_nan(monkeypatch, capsys, how):
    args, real_step, calls = vg.parse_args(["--batch-size", "16"]), vg.train_step, []

    def device_side(G, D, opt_G, opt_D, real, z):
        calls.append(1)
        on_device = len(calls) % 2 == 1  # each batch on the device, then on the CPU
        if on_device and how == "rounding":  # ten times float32's rounding differences
            noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(len(calls)))
            real = real * (1 + 1e-6 * noise)
        if on_device and how == "wrong layer":  # one kernel off by 0.5%
            D.net[1].register_forward_hook(lambda module, inputs, out: out * 1.005)
        if on_device and how == "wrong update":  # Adam's step 50% too large
            opt_G.param_groups[0]["lr"] *= 1.5
        stats = real_step(G, D, opt_G, opt_D, real, z)
        if on_device and how == "nan":  # G's update leaves one weight NaN
            G.net[0].weight.data[0, 0] = float("nan")
        return stats

    monkeypatch.setattr(vg, "train_step", device_side)
    monkeypatch.setattr(torch.Tensor, "double", None)  # MPS has no float64: none is used
    if how == "rounding":
        vg.device_check(args, torch.device("cpu"))
        assert "device check passed: cpu matches the CPU" in capsys.readouterr().out
    else:
        with pytest.raises(vg.GanError, match="device check failed: cpu differs from the CPU"):
            vg.device_check(args, torch.device("cpu"))


def test_a_folder_of_your_own_images_trains_resumes_and_generates_in_colour(capsys, tmp_path):
    folder = tmp_path / "images"  # odd-sized grey PNGs and colour JPEGs, nested, a broken file
    for i in range(40):
        sub = folder / ("grey" if i % 2 else "colour/deep")
        sub.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(torch.randint(0, 256, (30 + i, 40, 3), dtype=torch.uint8).numpy())
        ending = ".png" if i % 2 else ".JPG"
        image.convert("L" if i % 2 else "RGB").save(sub / f"{i}{ending}")
    (folder / "grey" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    pixels = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)  # loaded back exactly:
    (folder / "exact").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image.numpy()).save(folder / "exact" / f"{i}.png")
        Image.fromarray(image[..., 0].numpy()).save(folder / "exact" / f"grey{i}.png")
    assert torch.equal(vg.read_folder(folder / "exact", 3, 28)[:2], pixels.permute(0, 3, 1, 2))
    grey = pixels[..., :1].permute(0, 3, 1, 2)
    assert torch.equal(vg.read_folder(folder / "exact", 1, 28)[2:], grey)
    base = ["--dataset", "folder", "--data-dir", folder, "--batch-size", 16, "--device", "cpu"]
    code, out, err = run_main(capsys, *base, "--out-dir", tmp_path / "grey", "--max-steps", 1)
    assert code == 0, err
    assert "reading 45 images" in out and f"44 images from {folder} in" in out
    assert f"1 unreadable, skipped, e.g. {folder / 'grey' / 'broken.png'}" in out
    run = tmp_path / "rgb"
    proc = cli(*base, "--channels", 3, "--image-size", 32, "--out-dir", run, "--max-steps", 2)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert load(run / "checkpoint.pt")["G_avg"]["net.6.bias"].shape == (3 * 32 * 32,)
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", run)
    image = Image.open(run / "generated.png")
    assert code == 0 and image.mode == "RGB" and image.size == (2 * 34 + 2, 2 * 34 + 2), err
    assert vg.load_generator(run)(torch.randn(2, 100)).shape == (2, 3, 32, 32)
    before = (run / "checkpoint.pt").read_bytes()
    for flags, words in ((["--image-size", 28], "--image-size 32, not 28"),
                         (["--dataset", "mnist"], "the run has --dataset folder, not mnist")):
        assert_refused(*run_main(capsys, "--resume", run, *flags)[::2], 1, words)
    assert (run / "checkpoint.pt").read_bytes() == before
    assert run_main(capsys, "--resume", run, "--max-steps", 3)[0] == 0
    for path in sorted(folder.rglob("*.JPG"))[:2]:  # the grey run stopped mid-epoch; then
        path.unlink()  # the folder changed
    code, _, err = run_main(capsys, "--resume", tmp_path / "grey")
    assert_refused(code, err, 1, "the run's epoch has 44 images", "has 42: put them back")
    empty = tmp_path / "empty"  # a folder whose only image is broken
    empty.mkdir()
    shutil.copy(folder / "grey" / "broken.png", empty)
    for data_dir, flags, words in ((tmp_path / "nothing", [], "no images in"),
                                   (empty, [], "no image in"),
                                   (folder, ["--out-dir", folder / "run"], "outside --data-dir"),
                                   (folder, ["--batch-size", 64], "exceeds the 42 images")):
        code, _, err = run_main(capsys, *base, "--data-dir", data_dir, "--max-steps", 1, *flags)
        assert_refused(code, err, 1, words)
    code, _, err = run_main(capsys, *base, "--eval")
    assert code == 2 and "--eval needs digits, not folder" in err


def test_the_readme_sets_up_a_venv_and_its_python_blocks_run_as_written(trained, tmp_path):
    """The set-up activates the venv; the notebook block runs twice on MNIST or stand-ins, and
    the trained-G block on a run."""
    readme = (SCRIPT.parent / "README.md").read_text()
    blocks = [block.split("```")[0] for block in readme.split("```python\n")[1:]]
    setup = next(line for line in readme.splitlines() if line.startswith("    python3 -m venv"))
    assert setup.index(". .venv/bin/activate") < setup.index("python vanilla_gan.py")
    if os.environ.get("MNIST_DIR"):  # the real digits
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "MNIST").symlink_to(Path(os.environ["MNIST_DIR"]).resolve() / "MNIST")
    else:
        write_dataset(tmp_path / "data", n_train=2048)
    here = f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
    (tmp_path / "notebook.py").write_text(here + blocks[0] + "\nassert code == 0\n")
    (tmp_path / "both.py").write_text(here + blocks[0] + "\nassert code == 0\n" + blocks[1])
    shutil.copytree(trained[0], tmp_path / "runs" / "mnist")
    for script in ("notebook.py", "both.py"):  # the notebook block twice, then the other one
        proc = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list((tmp_path / "runs").glob("*/checkpoint.pt"))) == 3  # two new, and mnist
    assert Image.open(tmp_path / "walk.png").size == (10 * 30 + 2, 32)  # a row of 10


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

"""Tests for vanilla_gan.py, on small MNIST-format files that torchvision reads. MNIST_DIR, a
folder holding MNIST/raw/, gives the README's notebook blocks the real digits."""
import contextlib
import copy
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image

import vanilla_gan as vg

SCRIPT = Path(__file__).resolve().parent / "vanilla_gan.py"
SMALL = ["--batch-size", 64, "--log-every", 3, "--device", "cpu", "--epochs", 3]  # 8 steps/epoch
CPU = torch.device("cpu")
bce = torch.nn.functional.binary_cross_entropy_with_logits
load = partial(torch.load, weights_only=True)


def write_dataset(root, folder="MNIST", n_train=512, n_test=64):
    """Stand-in digits as IDX files: class k is a bar at its own place, of a random brightness."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n) % 10
        for i, k in enumerate(labels.tolist()):
            row = 2 + k // 5 * 13 + torch.randint(0, 3, (1,), generator=gen).item()
            images[i, row:row + 8, 1 + k % 5 * 5:5 + k % 5 * 5] = 180 + i % 76
        for kind, tensor, magic in (("images-idx3", images, 2051),
                                    ("labels-idx1", labels.to(torch.uint8), 2049)):
            head = struct.pack(f">{tensor.dim() + 1}I", magic, *tensor.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(head + tensor.numpy().tobytes())
    return Path(root)


def run_main(capsys, *args):
    return (vg.main([str(arg) for arg in args]), *capsys.readouterr())


def assert_refused(capsys, args, *words):
    """main(args) refuses in one line holding each of `words`: exit 1, no traceback."""
    code, out, err = run_main(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert all(word in lines[0] for word in words), lines[0]
    return out


def same_weights(a, b, keys=("G", "D", "G_avg")):
    return all(a[k].keys() == b[k].keys() and all(map(torch.equal, a[k].values(), b[k].values()))
               for k in keys)


def kinds(net):
    return [type(m).__name__ for m in net.net]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(data_root, tmp_path_factory):  # 12 steps with --amp, stopped in epoch 2
    run, out, autocasts = tmp_path_factory.mktemp("trained") / "run", io.StringIO(), []
    args = ["--data-dir", data_root, "--out-dir", run, "--max-steps", 12, "--amp", *SMALL]

    def spy(device_type, dtype, real=torch.autocast):
        autocasts.append((device_type, dtype))
        return real(device_type, dtype)
    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "autocast", spy)
        assert vg.main([str(arg) for arg in args]) == 0
    return run, out.getvalue(), autocasts


def test_train_step_is_the_textbook_step(monkeypatch):
    """Two steps against the textbook's losses and two D passes, gradient by gradient."""
    torch.manual_seed(0)
    G, D = vg.Generator(hidden=(32,)), vg.Discriminator(hidden=(32,), dropout=0)
    opt_G, opt_D = vg.make_optimizer(G), vg.make_optimizer(D)
    seen = []  # at each optimiser step: its gradients, D's weights
    for opt, net in ((opt_D, D), (opt_G, G)):
        def record(step=opt.step, net=net):
            seen.append(([p.grad.clone() for p in net.parameters()], copy.deepcopy(D)))
            step()
        opt.step = record
    monkeypatch.setattr(torch, "autocast", None)  # without --amp, no autocast at all
    for _ in range(2):
        real, z = torch.rand(16, 1, 28, 28) * 2 - 1, torch.randn(16, 100)
        G0, D0 = copy.deepcopy(G).requires_grad_(True), copy.deepcopy(D).requires_grad_(True)
        seen.clear()
        stats = vg.train_step(G, D, opt_G, opt_D, real, z)
        fake, ones, zeros = G0(z), torch.ones(16, 1), torch.zeros(16, 1)
        real_logits, fake_logits = D0(real), D0(fake.detach())
        loss_D = bce(real_logits, ones) + bce(fake_logits, zeros)  # D: real 1, fake 0, D first
        loss_G = bce(seen[1][1](fake), ones)  # G: -log D(G(z)), D after its update
        for (grads, _), loss, net in zip(seen, (loss_D, loss_G), (D0, G0), strict=True):
            expected = torch.autograd.grad(loss, list(net.parameters()))
            torch.testing.assert_close(grads, list(expected), rtol=1e-4, atol=1e-7)
        expected = [loss_D, loss_G, real_logits.sigmoid().mean(), fake_logits.sigmoid().mean()]
        torch.testing.assert_close(stats, torch.stack(expected).detach())


def test_the_networks_an_epoch_of_each_image_once_in_tanh_range_and_the_ema(monkeypatch):
    torch.manual_seed(0)
    G, D = vg.Generator(), vg.Discriminator()  # the defaults: LeakyReLU(0.2), dropout 0.3
    assert kinds(G) == ["Linear", "LeakyReLU"] * 3 + ["Linear", "Tanh"]
    assert kinds(D) == ["Flatten"] + ["Linear", "LeakyReLU", "Dropout"] * 2 + ["Linear"]  # logits
    bn = vg.Generator(8, (16, 32), activation="relu", batchnorm=True)
    assert kinds(bn) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "Tanh"]
    dropped = []
    D.net[3].register_forward_hook(
        lambda m, i, out: dropped.append(((out == 0) & (i[0] != 0)).float().mean().item()))
    vg.train_step(G, D, vg.make_optimizer(G), vg.make_optimizer(D),
                  torch.rand(64, 1, 28, 28) * 2 - 1, torch.randn(64, 100))
    assert len(dropped) == 2 and all(abs(x - 0.3) < 0.05 for x in dropped)
    z = torch.randn(16, 8)  # BatchNorm: in eval mode each image from its own z alone
    bn(z)  # moves the running statistics from their start
    assert torch.allclose(vg.sample(bn, z)[:1], vg.sample(bn, z[:1]), atol=1e-6) and bn.training
    assert not torch.allclose(bn(z)[:1], bn(z[:2])[:1], atol=1e-3)  # in training mode it is not
    pixels = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    pixels[0], pixels[1] = 0, 255
    G, seen, order = vg.Generator(hidden=(8,)), [], torch.randperm(100)
    ema = vg.EMA(G)

    def fake_step(G, D, opt_G, opt_D, real, z, amp):
        seen.append((real, z, amp))
        return torch.zeros(4)
    monkeypatch.setattr(vg, "train_step", fake_step)
    steps = list(vg.train_epoch(G, None, None, None, pixels, 32, order, True, ema))
    assert len(steps) == ema.steps == 3 and all(amp for *_, amp in seen)  # the last 4 images wait
    real = torch.cat([real for real, _, _ in seen])
    assert torch.equal(real, pixels[order[:96]].float() / 127.5 - 1)  # 0..255 -> [-1, 1]
    z = torch.stack([z for _, z, _ in seen])
    assert z.shape == (3, 32, 100) and abs(z.std() - 1) < 0.05 and not torch.equal(z[0], z[1])
    for decay in (0.9, 0):  # the averaged G: the EMA of G after a warm-up
        torch.manual_seed(0)
        G = vg.Generator(hidden=(8,), batchnorm=True)
        ema, expected = vg.EMA(G, decay), copy.deepcopy(G.state_dict())
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
            assert torch.allclose(ema.G.state_dict()[name], expected[name], atol=1e-5), name
            assert torch.equal(ema.G.state_dict()[name], live) == (decay == 0)  # 0: G itself
        assert torch.equal(ema.G.net[1].running_mean, G.net[1].running_mean)  # buffers: copied


def test_fid_the_quality_report_eval_and_that_training_learns(capsys, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3000, 8, generator=gen).double() @ torch.randn(8, 8, generator=gen).double()
            for _ in range(2))
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # Tr((C_a C_b)^(1/2)) as the trace of the
    values, vectors = torch.linalg.eigh(cov_a)  # symmetric (C_a^(1/2) C_b C_a^(1/2))^(1/2)
    root_a = vectors @ torch.diag(values.sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).sqrt().sum()
    expected = (a.mean(0) - b.mean(0)).square().sum() + (cov_a + cov_b).trace() - 2 * cross
    assert vg.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-8)
    root = write_dataset(tmp_path / "data", n_train=1200, n_test=300)
    images, labels = vg.load_dataset("mnist", root)
    real = vg.to_unit_range(images[600:])  # as a perfect G draws
    fid_real, shares_real = vg.report_quality(real, "mnist", root, CPU)
    fid_collapsed, shares = vg.report_quality(real[labels[600:] < 3], "mnist", root, CPU)
    assert capsys.readouterr().out.strip().endswith(
        "quality of 180 samples: FID %.2f, rarest class 3 at 0.0%%" % fid_collapsed)
    assert fid_real * 10 < fid_collapsed and shares_real.min() > 0.09 and shares[:3].sum() == 1
    run = tmp_path / "run"  # --eval after training: the averaged G against the test split
    monkeypatch.setattr(vg, "EVAL_SAMPLES", 1000)  # 10,000 by default
    code, out, err = run_main(capsys, "--data-dir", root, "--out-dir", run, "--eval",
                              "--max-steps", 24, *SMALL)
    assert code == 0 and "quality of 1000 samples: FID" in out, err
    printed = float(re.search(r"FID ([\d.]+)", out).group(1))
    z = torch.randn(1000, 100, generator=torch.Generator().manual_seed(0))
    judge = vg.train_classifier(images, labels, CPU)
    test_set = vg.judge(judge, vg.to_unit_range(vg.load_dataset("mnist", root, False)[0]))[0]
    torch.manual_seed(42)  # the run's first weights: training improves on them
    fids = [vg.frechet_distance(vg.judge(judge, vg.sample(G, z))[0], test_set)
            for G in (vg.load_generator(run), vg.Generator())]
    assert printed == pytest.approx(fids[0], abs=0.006) and printed < 0.7 * fids[1]
    monkeypatch.chdir(root)  # no data/ here: the run remembers its folder
    code, out, err = run_main(capsys, "--generate", 200, "--checkpoint", run, "--eval")
    assert code == 0 and "quality of 200 samples: FID" in out, err
    out = assert_refused(capsys, ["--generate", 128, "--eval", "--checkpoint", run,
                                  "--out", "x.pt"], "--eval needs over 128 samples, not 128")
    assert "judge" not in out and not Path("x.pt").exists()  # refused before any work
    with pytest.raises(vg.GanError, match="needs over 128 samples"):  # a notebook's call too
        vg.report_quality(real[:128], "mnist", root, CPU)


def test_each_likely_mistake_is_one_line_or_argparse_usage(capsys, data_root, tmp_path,
                                                           monkeypatch):
    for name in ("http_proxy", "https_proxy"):  # downloading fails at once
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    assert_refused(capsys, ["--data-dir", "typo"], f"mnist from {tmp_path / 'typo/MNIST/raw'} (",
                   "put its four files, or their .gz, there")
    images = write_dataset(tmp_path / "d") / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(b"<html><body>404 Not Found</body></html>")  # an error page saved as it
    with pytest.raises(vg.GanError, match=f"cannot load mnist from {images.parent}"):
        vg.load_dataset("mnist", tmp_path / "d")
    for name, folder in (("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")):
        assert len(vg.load_dataset(name, write_dataset(tmp_path, folder, 20))[0]) == 20
    for device, seen in (("cuda", torch.cuda.is_available()),
                         ("mps", torch.backends.mps.is_available())):
        for flags in [] if seen else (["--device", device], ["--check-device", "--device", device]):
            assert_refused(capsys, flags, f"no {device} here: torch {torch.__version__}")
    assert_refused(capsys, ["--data-dir", data_root, "--batch-size", 513], "513: only 512 images")
    assert not (tmp_path / "runs").exists()  # each refused before a run folder was made
    for flag, value in (("--lr", "2e4"), ("--epochs", "0"), ("--device", "tpu")):
        code, _, err = run_main(capsys, flag, value)
        assert code == 2 and err.startswith("usage: vanilla_gan.py"), err
        assert err.strip().splitlines()[-1].startswith(f"vanilla_gan.py: error: argument {flag}")


def test_a_run_leaves_every_output_and_generates_from_its_averaged_g(capsys, trained, tmp_path,
                                                                     monkeypatch):
    run, out, autocasts = trained
    for name in ("samples/epoch_001.png", "samples/step_0000012.png", "samples/progress.gif",
                 "losses.png", "metrics.csv", "checkpoint.pt", "flags.json"):
        assert (run / name).stat().st_size > 0, name
    assert autocasts == [("cpu", torch.bfloat16)] * 12  # --amp: each step under autocast
    rows = [row.split(",")[:2] for row in (run / "metrics.csv").read_text().splitlines()]
    assert rows == [["epoch", "step"], ["1", "3"], ["1", "6"], ["2", "9"], ["2", "12"]]
    assert all(words in out for words in ("[2/3][4/8] step 12  Loss_D", "amp True", "512 images",
                                          "epoch 2/3: mean of 4 steps Loss_D")), out
    checkpoint = load(run / "checkpoint.pt")
    assert checkpoint["step"] == 12 and checkpoint["epoch"] == 1 and checkpoint["done"] == 4 * 64
    order, flags = checkpoint["order"], checkpoint["args"]  # the order: shuffled each epoch
    assert torch.equal(order.sort().values, torch.arange(512)) and order[0] != 0
    assert json.loads((run / "flags.json").read_text()) == flags and json.dumps(flags) in out
    torch.manual_seed(42)  # the averaged G moved from the first weights, and is not G
    assert not same_weights(checkpoint, {"G_avg": vg.Generator().state_dict()}, ["G_avg"])
    assert not same_weights(checkpoint, {"G_avg": checkpoint["G"]}, ["G_avg"])
    G = vg.load_generator(run)  # the last grid: the averaged G on the fixed noise
    vg.save_grid(vg.sample(G, checkpoint["fixed_noise"]), tmp_path / "grid.png")
    grid = Image.open(run / "samples/step_0000012.png")
    assert grid.tobytes() == Image.open(tmp_path / "grid.png").tobytes()
    with Image.open(run / "samples/progress.gif") as gif:  # one frame an epoch
        assert gif.n_frames == 1 and gif.size == grid.size
    for name, source, seed in (("a", run / "checkpoint.pt", 1), ("b", run, 1), ("c", run, 2)):
        code, out, err = run_main(capsys, "--generate", 10, "--checkpoint", source, "--seed", seed,
                                  "--out", tmp_path / name / "x.pt")  # a new folder: made
        assert code == 0 and "10 images to" in out and "from step 12 (epochs done: 1)" in out
    a, b, c = (load(tmp_path / name / "x.pt") for name in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeds differ
    z = torch.randn(10, 100, generator=torch.Generator().manual_seed(1))  # the CPU's noise
    assert torch.equal(a, vg.sample(G, z)) and not G.training and not G.net[0].weight.requires_grad
    monkeypatch.chdir(tmp_path)
    assert run_main(capsys, "--generate", 16, "--checkpoint", run)[0] == 0
    assert Image.open("generated.png").size == (4 * 30 + 2, 4 * 30 + 2)  # here by default
    generate, before = ["--generate", 4, "--checkpoint"], (run / "checkpoint.pt").read_bytes()
    for flags, words in ((["--g-hidden", 64], "[256, 512, 1024], not [64]"),
                         (["--out", tmp_path / "x"], "x: end it in .png, .jpg"),
                         (["--out", run / "checkpoint.pt"], "is the checkpoint it reads")):
        assert_refused(capsys, [*generate, run, *flags], words)
    assert (run / "checkpoint.pt").read_bytes() == before

    class Payload:
        def __reduce__(self):  # unpickling this would call Path.touch("pwned")
            return (Path.touch, (Path("pwned"),))
    torch.save({"args": {}, "G_avg": Payload()}, tmp_path / "evil.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes(before[:5000])
    for path, words in (("evil.pt", "damaged or not a checkpoint"), ("truncated.pt", "damaged"),
                        ("foreign.pt", "is not a vanilla_gan checkpoint"), ("no.pt", "missing")):
        for flags in ([*generate, path], ["--resume", path]):
            assert_refused(capsys, flags, words)
        with pytest.raises(vg.GanError, match=words):
            vg.load_generator(path)
    assert not (tmp_path / "pwned").exists()


def test_every_model_data_and_optimiser_flag_arrives_and_each_tutorial_setup(
        capsys, data_root, tmp_path, monkeypatch):
    seen, real_epoch = [], vg.train_epoch

    def spy(G, D, opt_G, opt_D, pixels, batch_size, order, amp, ema):
        seen.append((copy.deepcopy(G), D, opt_G, opt_D, pixels, batch_size, amp, ema))
        return real_epoch(G, D, opt_G, opt_D, pixels, batch_size, order, amp, ema)
    monkeypatch.setattr(vg, "train_epoch", spy)
    flags = ["--latent-dim", 16, "--g-hidden", 32, 48, "--g-activation", "relu", "--g-batchnorm",
             "--d-hidden", 24, "--d-dropout", 0.2, "--ema-decay", 0.5, "--batch-size", 32,
             "--lr", 1e-3, "--seed", 7, "--amp", "--data-dir", data_root, "--device", "cpu"]
    assert run_main(capsys, *flags, "--out-dir", tmp_path, "--max-steps", 2)[0] == 0
    assert run_main(capsys, "--resume", tmp_path, "--lr", 5e-4, "--max-steps", 4)[0] == 0
    torch.manual_seed(7)  # the seed's first weights
    first = vg.Generator(16, (32, 48), activation="relu", batchnorm=True).state_dict()
    assert same_weights({"G": seen[0][0].state_dict()}, {"G": first}, ["G"])
    for (G, D, opt_G, opt_D, pixels, batch_size, amp, ema), lr in zip(seen, (1e-3, 5e-4)):
        assert kinds(G) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "Tanh"]
        assert [m.out_features for m in G.net if hasattr(m, "out_features")] == [32, 48, 784]
        assert [m.out_features for m in D.net if hasattr(m, "out_features")] == [24, 1]
        assert [m.p for m in D.net if hasattr(m, "p")] == [0.2] and ema.decay == 0.5
        assert batch_size == 32 and torch.equal(pixels, vg.load_dataset("mnist", data_root)[0])
        for group in (opt_G.param_groups[0], opt_D.param_groups[0]):
            assert group["lr"] == lr and tuple(group["betas"]) == (0.5, 0.999)
    assert [args[6] for args in seen] == [True, False]  # --amp: a machine's flag, not kept
    for name, setup in vg.CONFIGS.items():
        run = tmp_path / name  # each by its name alone, then generated with no model flag
        assert run_main(capsys, "--config", name, "--data-dir", data_root, "--out-dir", run,
                        "--max-steps", 2)[0] == 0
        assert run_main(capsys, "--generate", 4, "--checkpoint", run, "--out", run / "x.pt")[0] == 0
        assert {k: load(run / "checkpoint.pt")["args"][k] for k in setup} == setup, name
        assert ("BatchNorm1d" in kinds(vg.load_generator(run))) == setup["g_batchnorm"], name
    assert vg.parse_args(["--config", "deep", "--lr", "1e-3"]).lr == 1e-3  # typed flags win


def test_resume_keeps_the_run_refuses_a_second_trainer_and_stops_on_divergence(
        capsys, data_root, trained, tmp_path, monkeypatch):
    run = shutil.copytree(trained[0], tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes()
    out = assert_refused(capsys, ["--data-dir", data_root, "--out-dir", run, *SMALL],
                         f"{run} holds another run: --resume {run}")
    assert "Loss_D" not in out  # refused before training
    for flags, words in ((["--d-dropout", 0.5], "the run has --d-dropout 0.3, not 0.5"),
                         (["--config", "classic"], "the run has --batch-size 64, not 128")):
        assert_refused(capsys, ["--resume", run, *flags], words)
    assert (run / "checkpoint.pt").read_bytes() == before
    moved = run.rename(tmp_path / "moved")  # a moved run resumes where it is now
    code, out, err = run_main(capsys, "--resume", moved / "checkpoint.pt", "--log-every", 5)
    assert code == 0 and f"run folder {moved}" in out and "done: 24 steps" in out, err
    assert "[3/3][4/8] step 20" in out and "step 18" not in out  # every 5 steps now
    code, out, err = run_main(capsys, "--resume", moved, "--out-dir", tmp_path / "new")
    claimed = tmp_path / "new" / "checkpoint.pt"  # a finished copy, claimed
    assert code == 0 and "done: 24 steps" in out and load(claimed)["step"] == 24, err
    real_step, calls, other = vg.train_step, [], tmp_path / "other.pt"
    first = vg.stamp(claimed)  # and what a first trainer in "new" then saves:
    torch.save({**load(claimed), "step": 99}, other)

    def third_step_goes_wrong(G, *args):  # G's weights overflow, or a first trainer saves
        calls.append(1)
        if len(calls) == 3:
            G.net[0].weight.data[0, 0] = float("inf")
        if len(calls) == 9:  # the second trainer's first step: nothing written yet
            assert vg.stamp(claimed) == first
        if len(calls) == 11:
            shutil.copy(other, claimed)
        return real_step(G, *args)
    monkeypatch.setattr(vg, "train_step", third_step_goes_wrong)
    before = load(moved / "checkpoint.pt")
    assert_refused(capsys, ["--resume", moved, "--epochs", 4], "diverged by step 32")
    assert same_weights(before, load(moved / "checkpoint.pt"))  # nothing saved since it began
    files = sorted(claimed.parent.rglob("*"))
    assert_refused(capsys, ["--resume", claimed.parent, "--epochs", 4], "new holds another run")
    assert claimed.read_bytes() == other.read_bytes() and sorted(claimed.parent.rglob("*")) == files


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_prints_the_resume_line_and_the_resumed_run_ends_as_an_unstopped_one(
        capsys, data_root, tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["--data-dir", data_root, *SMALL, "--log-every", 1, "--epochs", 1000]
    proc = subprocess.Popen(  # a real process; SIGINT not ignored, as in a terminal
        [sys.executable, str(SCRIPT), *map(str, flags), "--out-dir", str(run)], text=True,
        env=dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = next(line for line in proc.stdout if "step 17 " in line)  # epoch 2's checkpoint saved
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    rate = float(re.search(r"([\d,]+) img/s", line).group(1).replace(",", ""))
    hours, minutes, seconds = map(int, re.search(r"(\d+):(\d\d):(\d\d) left", line).groups())
    left = (8000 - 17) * 64 / rate  # 1000 epochs of 8 steps at the rate printed
    assert abs(hours * 3600 + minutes * 60 + seconds - left) <= 1 + left / 100, line
    step = load(run / "checkpoint.pt")["step"]
    assert step % 8 == 0 and step >= 16
    assert proc.returncode == 130 and "Traceback" not in err and not list(run.rglob(".*.tmp"))
    assert f"resume from step {step}: python vanilla_gan.py --resume {run}" in out
    for steps in (step + 3, step + 6):  # at an epoch's end, then mid-epoch
        code, out, _ = run_main(capsys, "--resume", run, "--max-steps", steps)
    mean = next(line for line in out.splitlines() if line.startswith(f"epoch {step // 8 + 1}/"))
    assert run_main(capsys, *flags, "--out-dir", straight, "--max-steps", step + 6)[0] == 0
    a, b = load(run / "checkpoint.pt"), load(straight / "checkpoint.pt")
    assert code == 0 and a["step"] == step + 6 and same_weights(a, b)
    printed = [float(x) for x in re.findall(r" (\d\.\d{4})", mean)]  # the 3 steps' means:
    assert printed == pytest.approx([sum(r[k] for r in a["metrics"] if r["step"] > step + 3) / 3
                                     for k in vg.STATS], abs=2e-4)
    assert torch.equal(a["fixed_noise"], b["fixed_noise"]) and a["metrics"] == b["metrics"]


@pytest.mark.parametrize("how", ["rounding", "wrong layer", "wrong update", "nan"])
def test_device_check_passes_rounding_and_fails_a_wrong_layer_update_or_nan(
        capsys, monkeypatch, tmp_path, how):
    """cpu:0 stands in for a GPU: its steps are faulted, the CPU's are not."""
    gpu, real_step, real_check, sides = torch.device("cpu", 0), vg.train_step, vg.check_step, []

    def check_step(flags, real, z, device):
        sides.append(device)
        return real_check(flags, real, z, device)

    def device_side(G, D, opt_G, opt_D, real, z, amp=False):
        on_device = sides[-1] == gpu
        if on_device and how == "rounding":  # ten times float32's rounding differences
            real = real * (1 + 1e-6 * torch.randn(real.shape))
        if on_device and how == "wrong layer":  # one kernel off by 0.5%
            D.net[1].register_forward_hook(lambda module, inputs, out: out * 1.005)
        if on_device and how == "wrong update":  # Adam's step 50% too large
            opt_G.param_groups[0]["lr"] *= 1.5
        stats = real_step(G, D, opt_G, opt_D, real, z, amp)
        if on_device and how == "nan":  # G's update leaves one weight NaN
            G.net[0].weight.data[0, 0] = float("nan")
        return stats
    for name, value in (("train_step", device_side), ("check_step", check_step),
                        ("pick_device", lambda name: gpu), ("CHECK_SECONDS", 0.5)):
        monkeypatch.setattr(vg, name, value)
    monkeypatch.chdir(tmp_path)
    flags = ["--check-device", "--batch-size", 100, "--epochs", 2]
    if how != "rounding":
        out = assert_refused(capsys, flags, "device check failed: cpu:0 is off by")
        assert "training" not in out and sides == [gpu, CPU] * 5
        return
    code, out, err = run_main(capsys, *flags)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"device cpu:0  torch {torch.__version__}"), err
    error = float(lines[1].split("matches the CPU to ")[1])
    assert lines[1].startswith("device check passed: cpu:0") and 0 < error <= vg.TOLERANCE
    rate, minutes = re.search(r"([\d,]+) img/s; 2 epochs of MNIST \(1,200 steps\) in ([\d.]+)",
                              lines[2]).groups()
    assert float(minutes) == pytest.approx(2000 / float(rate.replace(",", "")), abs=0.06)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_folder_of_images_trains_resumes_and_generates_in_colour(capsys, data_root, tmp_path):
    folder = tmp_path / "images"  # odd-sized grey PNGs and colour JPEGs, nested, a broken file
    for i in range(40):
        sub = folder / ("grey" if i % 2 else "colour/deep")
        sub.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(torch.randint(0, 256, (30 + i, 40, 3), dtype=torch.uint8).numpy())
        image.convert("L" if i % 2 else "RGB").save(sub / f"{i}{'.png' if i % 2 else '.JPG'}")
    (folder / "grey" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    pixels = torch.randint(0, 256, (28, 28, 3), dtype=torch.uint8)  # read back exactly
    Image.fromarray(pixels.numpy()).save(tmp_path / "exact.png")
    assert torch.equal(vg.read_folder(tmp_path, 3, 28)[0], pixels.permute(2, 0, 1))
    base = ["--dataset", "folder", "--data-dir", folder, "--batch-size", 16, "--device", "cpu"]
    code, out, err = run_main(capsys, *base, "--out-dir", tmp_path / "grey", "--max-steps", 1)
    assert code == 0 and "40 images, run folder" in out, err  # the broken file skipped
    run = tmp_path / "rgb"
    flags = ["--channels", 3, "--image-size", 32, "--out-dir", run, "--max-steps", 2]
    assert run_main(capsys, *base, *flags)[0] == 0
    assert run_main(capsys, "--generate", 4, "--checkpoint", run, "--out", run / "g.png")[0] == 0
    assert Image.open(run / "g.png").mode == "RGB" and Image.open(run / "g.png").size == (70, 70)
    for path in sorted(folder.rglob("*.JPG"))[:2]:  # the grey run stopped mid-epoch; then
        path.unlink()  # the folder changed
    assert_refused(capsys, ["--resume", tmp_path / "grey"], "epoch has 40 images", "38: put")
    for data_dir, flags, words in ((folder / "typo", [], "no folder"),
                                   (data_root, [], "no readable images"),
                                   (folder, ["--out-dir", folder / "run"], "inside --data-dir")):
        assert_refused(capsys, [*base, "--data-dir", data_dir, "--max-steps", 1, *flags], words)


def test_the_readme_sets_up_a_venv_and_its_python_blocks_run_in_order(tmp_path):
    """After a run, one notebook runs the trained-G block, then the training block twice."""
    readme = (SCRIPT.parent / "README.md").read_text()
    blocks = [block.split("```")[0] for block in readme.split("```python\n")[1:]]
    setup = next(line for line in readme.splitlines() if line.startswith("    python3 -m venv"))
    assert setup.index(". .venv/bin/activate") < setup.index("python vanilla_gan.py")
    if os.environ.get("MNIST_DIR"):  # the real digits
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "MNIST").symlink_to(Path(os.environ["MNIST_DIR"]).resolve() / "MNIST")
    else:
        write_dataset(tmp_path / "data", n_train=2048)
    first = f"import sys\nsys.path.insert(0, {str(SCRIPT.parent)!r})\nimport vanilla_gan\n" \
            "assert vanilla_gan.main(['--max-steps', '2']) == 0\n"
    notebook = f"{first}{blocks[0]}{blocks[1]}\nassert code == 0\n{blocks[1]}"
    proc = subprocess.run([sys.executable, "-c", notebook], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [p for p in (tmp_path / "runs").iterdir() if not p.is_symlink()]
    assert len(runs) == 3 and all((p / "checkpoint.pt").exists() for p in runs)
    assert Image.open(tmp_path / "walk.png").size == (10 * 30 + 2, 32)  # a row of 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_check_exact_resume_and_amp(capsys, data_root, tmp_path):
    code, out, err = run_main(capsys, "--check-device", "--device", "cuda")
    assert code == 0 and "passed: cuda matches the CPU" in out and "peak GPU memory" in out, err
    flags = ["--data-dir", data_root, "--device", "cuda", "--batch-size", 64, "--epochs", 3]
    for name, steps, *extra in (("a", 20), ("b", 12), ("amp", 5, "--amp")):
        assert run_main(capsys, *flags, "--out-dir", tmp_path / name, "--max-steps", steps,
                        *extra)[0] == 0
    assert run_main(capsys, "--resume", tmp_path / "b", "--max-steps", 20)[0] == 0  # auto: cuda
    assert same_weights(*(load(tmp_path / run / "checkpoint.pt") for run in "ab"))
    assert run_main(capsys, "--resume", tmp_path / "a", "--device", "cpu")[0] == 0  # goes on there

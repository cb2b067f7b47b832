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
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image

import vanilla_gan as vg

SCRIPT = Path(__file__).resolve().parent / "vanilla_gan.py"
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
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
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        for i, k in enumerate(labels.tolist()):
            row = 2 + k // 5 * 13 + torch.randint(0, 3, (1,), generator=gen).item()
            images[i, row:row + 8, 1 + k % 5 * 5:5 + k % 5 * 5] = 180 + i % 76
        for kind, tensor, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
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
    for word in words:
        assert word in lines[0], lines[0]
    return out


def same_weights(a, b, keys=("G", "D", "G_avg")):
    return all(a[k].keys() == b[k].keys() and all(map(torch.equal, a[k].values(), b[k].values()))
               for k in keys)


def kinds(net):
    return [type(m).__name__ for m in net.net]


def printed_fid(out):
    return float(re.search(r"FID ([\d.]+)", out).group(1))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(data_root, tmp_path_factory):
    """12 steps of a small real run with --amp, stopped in epoch 2, outside the main thread as
    Gradio runs it, each autocast recorded: (folder, output, autocasts)."""
    run, out, codes, autocasts = tmp_path_factory.mktemp("trained") / "run", io.StringIO(), [], []
    args = [str(arg) for arg in ("--data-dir", data_root, "--out-dir", run, "--max-steps", 12,
                                 "--amp", *SMALL)]

    def spy(device_type, dtype):
        autocasts.append((device_type, dtype))
        return torch.amp.autocast(device_type, dtype)

    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "autocast", spy)
        thread = threading.Thread(target=lambda: codes.append(vg.main(args)))
        thread.start()
        thread.join()
    assert codes == [0]
    return run, out.getvalue(), autocasts


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
            seen.append((name, [p.grad.clone() for p in net.parameters()], copy.deepcopy(D)))
            step()
        opt.step = record
    monkeypatch.setattr(torch, "autocast", None)  # without --amp, no autocast at all
    D.requires_grad_(False)  # as a step stopped half way leaves it
    for _ in range(2):
        real, z = torch.rand(16, 1, 28, 28) * 2 - 1, torch.randn(16, 100)
        G0, D0 = copy.deepcopy(G).requires_grad_(True), copy.deepcopy(D).requires_grad_(True)
        seen.clear()
        stats = vg.train_step(G, D, opt_G, opt_D, real, z)
        assert [name for name, *_ in seen] == ["D", "G"]
        fake = G0(z)
        real_logits, fake_logits = D0(real), D0(fake.detach())
        ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
        loss_D = bce(real_logits, ones) + bce(fake_logits, zeros)  # D: real 1, fake 0
        loss_G = bce(seen[1][2](fake), ones)  # G: -log D(G(z)), D after its update
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
        D.net[-1].bias.fill_(50.0)
        assert (D(real) > 1).all()


def test_networks_layers_dropout_in_both_d_passes_and_batchnorm_sampled_in_eval_mode():
    torch.manual_seed(0)
    G, D = vg.Generator(), vg.Discriminator()  # the defaults: LeakyReLU(0.2), dropout 0.3
    assert kinds(G) == ["Linear", "LeakyReLU"] * 3 + ["Linear", "Tanh"]
    assert G.net[1].negative_slope == 0.2 and D.net[2].negative_slope == 0.2
    assert kinds(D) == ["Flatten"] + ["Linear", "LeakyReLU", "Dropout"] * 2 + ["Linear"]
    assert G(torch.randn(1, 100) * 1e4).abs().max() <= 1  # extreme noise: Tanh still bounds it
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


def test_train_epoch_feeds_each_image_once_scaled_to_tanh_range_with_fresh_noise(monkeypatch):
    pixels = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    pixels[0], pixels[1] = 0, 255
    G, seen = vg.Generator(hidden=(8,)), []
    ema = vg.EMA(G)

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
    G = vg.Generator(hidden=(8,), batchnorm=True)
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


def test_fid_the_quality_report_eval_and_that_training_learns(capsys, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3000, 8, generator=gen).double() @ torch.randn(8, 8, generator=gen).double()
            for _ in range(2))

    def sqrtm(c):  # of a symmetric positive semi-definite matrix
        values, vectors = torch.linalg.eigh(c)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    cross = sqrtm(sqrtm(cov_a) @ cov_b @ sqrtm(cov_a)).trace()
    expected = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    assert vg.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-8)
    root = write_dataset(tmp_path / "data", n_train=1200, n_test=300)
    images, labels = vg.load_dataset("mnist", root)
    real = vg.to_unit_range(images[600:])  # as a perfect G draws
    fid_real, shares_real = vg.report_quality(real, "mnist", root, CPU)
    fid_noise, _ = vg.report_quality(torch.rand(500, 1, 28, 28) * 2 - 1, "mnist", root, CPU)
    fid_collapsed, shares = vg.report_quality(real[labels[600:] < 3], "mnist", root, CPU)
    assert capsys.readouterr().out.strip().endswith(
        "quality of 180 samples: FID %.2f, rarest class 3 at 0.0%%" % fid_collapsed)
    assert fid_real * 10 < fid_noise and fid_real * 10 < fid_collapsed
    assert shares_real.min() > 0.09 and shares[:3].sum() == 1.0 and shares.sum() == 1.0
    run = tmp_path / "run"  # --eval after training: the averaged G against the test split
    monkeypatch.setattr(vg, "EVAL_SAMPLES", 1000)  # 10,000 by default
    code, out, err = run_main(capsys, "--data-dir", root, "--out-dir", run, "--eval",
                              "--max-steps", 24, *SMALL)
    assert code == 0 and "quality of 1000 samples: FID" in out, err
    z = torch.randn(1000, 100, generator=torch.Generator().manual_seed(0))
    judge = vg.train_classifier(images, labels, CPU)
    test_images = vg.load_dataset("mnist", root, train=False)[0]
    test_features = vg.judge(judge, vg.to_unit_range(test_images))[0]

    def fid_of(G):
        return vg.frechet_distance(vg.judge(judge, vg.sample(G, z))[0], test_features)

    assert printed_fid(out) == pytest.approx(fid_of(vg.load_generator(run)), abs=0.006)
    torch.manual_seed(42)  # the run's first weights: training improves on them
    assert printed_fid(out) < 0.7 * fid_of(vg.Generator())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no data/ here: the run remembers its folder
    code, out, err = run_main(capsys, "--generate", 200, "--checkpoint", run, "--eval")
    assert code == 0 and "quality of 200 samples: FID" in out, err
    out = assert_refused(capsys, ["--generate", 128, "--checkpoint", run, "--eval"],
                         "--eval needs over 128 samples, not 128")
    assert "judge" not in out  # refused before training it


def test_missing_or_damaged_data_is_one_line_naming_the_folder(capsys, tmp_path, monkeypatch):
    for name, value in OFFLINE.items():  # downloading fails at once
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "typo" / "MNIST" / "raw"
    assert_refused(capsys, ["--data-dir", "typo"], f"cannot load mnist from {raw} (",
                   "put its four files, or their .gz, there")
    images = write_dataset(tmp_path / "d") / "MNIST" / "raw" / "train-images-idx3-ubyte"
    for content in (images.read_bytes()[:5000], b"<html><body>404 Not Found</body></html>", b""):
        images.write_bytes(content)  # truncated, an error page saved as the file, empty
        with pytest.raises(vg.GanError, match=f"cannot load mnist from {images.parent}"):
            vg.load_dataset("mnist", tmp_path / "d")
    for name, folder in (("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")):
        write_dataset(tmp_path, folder, n_train=20)
        assert vg.load_dataset(name, tmp_path)[0].shape == (20, 1, 28, 28)


def test_a_smoke_run_leaves_every_output_and_uses_amp_and_the_averaged_g(trained, tmp_path):
    run, out, autocasts = trained
    for name in ("samples/epoch_001.png", "samples/step_0000012.png", "samples/progress.gif",
                 "losses.png", "metrics.csv", "checkpoint.pt", "flags.json"):
        assert (run / name).stat().st_size > 0, name
    assert not list(run.rglob(".*.tmp"))
    assert autocasts == [("cpu", torch.bfloat16)] * 12  # --amp: each step under autocast
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,Loss_D,Loss_G,D(x),D(G(z))"
    assert [row.split(",")[:2] for row in rows[1:]] == [["1", "3"], ["1", "6"], ["2", "9"],
                                                         ["2", "12"]]
    for words in ("[2/3][4/8] step 12  Loss_D", "epoch 1/3: mean Loss_D", "amp True",
                  "device cpu  torch", "512 images", "epoch 2/3: mean"):
        assert words in out, words
    checkpoint = load(run / "checkpoint.pt")
    assert checkpoint["step"] == 12 and checkpoint["epoch"] == 1 and checkpoint["done"] == 4 * 64
    order = checkpoint["order"]  # shuffled each epoch
    assert torch.equal(order.sort().values, torch.arange(512)) and order[0] != 0
    flags = checkpoint["args"]
    assert not {"device", "amp", "eval", "max_steps", "out_dir", "config"} & flags.keys()
    assert json.loads((run / "flags.json").read_text()) == flags and json.dumps(flags) in out
    torch.manual_seed(42)  # the averaged G moved from the first weights, and is not G
    first = {"G_avg": vg.Generator().state_dict(), "G": checkpoint["G"]}
    assert not same_weights(checkpoint, first, ["G_avg"])
    assert not same_weights(checkpoint, {"G_avg": checkpoint["G"]}, ["G_avg"])
    G = vg.load_generator(run)  # the last grid: the averaged G on the fixed noise
    vg.save_grid(vg.sample(G, checkpoint["fixed_noise"]), tmp_path / "grid.png")
    assert Image.open(run / "samples/step_0000012.png").tobytes() == \
        Image.open(tmp_path / "grid.png").tobytes()
    with Image.open(run / "samples/progress.gif") as gif:  # one frame an epoch
        assert gif.n_frames == 1 and gif.size == Image.open(run / "samples/epoch_001.png").size


def test_every_model_data_and_optimiser_flag_arrives_in_a_new_and_a_resumed_run(
        capsys, data_root, tmp_path, monkeypatch):
    seen, real_epoch = [], vg.train_epoch

    def spy(G, D, opt_G, opt_D, pixels, batch_size, order, amp, ema):
        seen.append((copy.deepcopy(G), D, opt_G, opt_D, pixels, batch_size, amp, ema))
        return real_epoch(G, D, opt_G, opt_D, pixels, batch_size, order, amp, ema)

    monkeypatch.setattr(vg, "train_epoch", spy)
    run = tmp_path / "run"
    flags = ["--latent-dim", 16, "--g-hidden", 32, 48, "--g-activation", "relu", "--g-batchnorm",
             "--d-hidden", 24, "--d-dropout", 0.2, "--ema-decay", 0.5, "--batch-size", 32,
             "--lr", 1e-3, "--seed", 7, "--amp", "--data-dir", data_root, "--device", "cpu"]
    assert run_main(capsys, *flags, "--out-dir", run, "--max-steps", 2)[0] == 0
    assert run_main(capsys, "--resume", run, "--lr", 5e-4, "--max-steps", 4)[0] == 0
    torch.manual_seed(7)  # the seed's first weights
    first = vg.Generator(16, (32, 48), activation="relu", batchnorm=True).state_dict()
    assert same_weights({"G": seen[0][0].state_dict()}, {"G": first}, ["G"])
    for (G, D, opt_G, opt_D, pixels, batch_size, amp, ema), lr in zip(seen, (1e-3, 5e-4)):
        assert G.latent_dim == 16 and kinds(G) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + [
            "Linear", "Tanh"]
        assert [m.out_features for m in G.net if hasattr(m, "out_features")] == [32, 48, 784]
        assert [m.out_features for m in D.net if hasattr(m, "out_features")] == [24, 1]
        assert [m.p for m in D.net if hasattr(m, "p")] == [0.2] and ema.decay == 0.5
        assert batch_size == 32 and torch.equal(pixels, vg.load_dataset("mnist", data_root)[0])
        for group in (opt_G.param_groups[0], opt_D.param_groups[0]):
            assert group["lr"] == lr and tuple(group["betas"]) == (0.5, 0.999)
    assert [args[6] for args in seen] == [True, False]  # --amp: a machine's flag, not kept


def test_resume_keeps_the_run_lets_length_lr_and_logging_change_and_stops_on_divergence(
        capsys, run_copy, tmp_path, monkeypatch):
    before = (run_copy / "checkpoint.pt").read_bytes()
    for flags, words in ((["--d-dropout", 0.5], "the run has --d-dropout 0.3, not 0.5"),
                         (["--g-hidden", 64, 64], "--g-hidden [256, 512, 1024], not [64, 64]"),
                         (["--config", "classic"], "the run has --batch-size 64, not 128")):
        assert_refused(capsys, ["--resume", run_copy, *flags], words)
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    moved = run_copy.rename(run_copy.parent / "moved")  # a moved run resumes where it is now
    code, out, err = run_main(capsys, "--resume", moved / "checkpoint.pt", "--log-every", 5)
    assert code == 0 and f"run folder {moved}" in out and "done: 24 steps" in out, err
    assert "[3/3][4/8] step 20" in out and "step 18" not in out  # every 5 steps now
    code, out, err = run_main(capsys, "--resume", moved, "--out-dir", tmp_path / "new")
    assert code == 0 and "done: 24 steps" in out and "step 24 " not in out, err
    assert load(tmp_path / "new" / "checkpoint.pt")["step"] == 24  # a finished copy, claimed
    real_step = vg.train_step

    def diverging_step(G, D, *args):  # G's weights overflow at step 27
        stats = real_step(G, D, *args)
        if len(calls) == 2:
            G.net[0].weight.data[0, 0] = float("inf")
        calls.append(1)
        return stats

    calls = []
    monkeypatch.setattr(vg, "train_step", diverging_step)
    before = load(moved / "checkpoint.pt")
    assert_refused(capsys, ["--resume", moved, "--epochs", 4], "diverged by step 32")
    after = load(moved / "checkpoint.pt")  # nothing saved since training began
    assert after["step"] == 24 and same_weights(before, after)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_prints_the_resume_line_and_the_resumed_run_ends_as_an_unstopped_one(
        capsys, data_root, tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["--data-dir", data_root, *SMALL, "--log-every", 1, "--epochs", 1000]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(  # a real process; SIGINT not ignored, as in a terminal
        [sys.executable, str(SCRIPT), *map(str, flags), "--out-dir", str(run)], env=env,
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
        assert run_main(capsys, "--resume", run, "--max-steps", steps)[0] == 0
    assert run_main(capsys, *flags, "--out-dir", straight, "--max-steps", step + 6)[0] == 0
    a, b = load(run / "checkpoint.pt"), load(straight / "checkpoint.pt")
    assert a["step"] == step + 6 and same_weights(a, b)
    losses = [[[row[k] for k in ("step", *vg.STATS)] for row in c["metrics"]] for c in (a, b)]
    assert torch.equal(a["fixed_noise"], b["fixed_noise"]) and losses[0] == losses[1]


def test_a_folder_holds_one_run_and_a_second_trainer_in_it_overwrites_nothing(
        capsys, data_root, run_copy, tmp_path, monkeypatch):
    before = (run_copy / "checkpoint.pt").read_bytes()
    out = assert_refused(capsys, ["--data-dir", data_root, "--out-dir", run_copy, *SMALL],
                         f"{run_copy} holds another run: --resume {run_copy}")
    assert "Loss_D" not in out  # refused before training
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    other = tmp_path / "other.pt"  # what a first trainer saves while the second one trains
    torch.save({**load(run_copy / "checkpoint.pt"), "step": 16}, other)
    real_step = vg.train_step

    def first_trainer_saves(*args):
        if not calls:
            shutil.copy(other, run_copy / "checkpoint.pt")
        calls.append(1)
        return real_step(*args)

    calls = []
    monkeypatch.setattr(vg, "train_step", first_trainer_saves)
    grids = sorted((run_copy / "samples").iterdir())
    assert_refused(capsys, ["--resume", run_copy], f"{run_copy} holds another run")
    assert (run_copy / "checkpoint.pt").read_bytes() == other.read_bytes()  # the first's, kept
    assert sorted((run_copy / "samples").iterdir()) == grids and len(calls) == 4


class Payload:
    def __reduce__(self):  # unpickling this would call Path.touch("pwned")
        return (Path.touch, (Path("pwned"),))


def test_generate_a_grid_or_a_tensor_and_refuse_what_is_not_a_checkpoint(capsys, trained,
                                                                        tmp_path, monkeypatch):
    run = trained[0]
    for name, source, seed in (("a", run / "checkpoint.pt", 1), ("b", run, 1), ("c", run, 2)):
        code, out, err = run_main(capsys, "--generate", 10, "--checkpoint", source, "--seed", seed,
                                  "--out", tmp_path / name / "x.pt")  # a new folder: made
        assert code == 0 and f"wrote 10 images to {tmp_path / name / 'x.pt'}" in out, err
        assert "sampled at step 12 (epochs done: 1)" in out
    a, b, c = (load(tmp_path / name / "x.pt") for name in "abc")
    assert a.shape == (10, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeds differ
    G = vg.load_generator(run)  # the averaged G, in eval mode, from noise drawn on the CPU
    z = torch.randn(10, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, vg.sample(G, z)) and not G.training and not G.net[0].weight.requires_grad
    monkeypatch.chdir(tmp_path)
    assert run_main(capsys, "--generate", 16, "--checkpoint", run)[0] == 0
    assert Image.open("generated.png").size == (4 * 30 + 2, 4 * 30 + 2)  # here by default
    generate = ["--generate", 4, "--checkpoint"]
    assert_refused(capsys, [*generate, run, "--g-hidden", 64], "[256, 512, 1024], not [64]")
    assert_refused(capsys, [*generate, run, "--out", tmp_path / "x"], "x: end it in .png, .jpg")
    before = (run / "checkpoint.pt").read_bytes()
    assert_refused(capsys, [*generate, run, "--out", run / "checkpoint.pt"], "checkpoint it reads")
    assert (run / "checkpoint.pt").read_bytes() == before
    torch.save({"args": {}, "G_avg": Payload()}, tmp_path / "evil.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes(before[:5000])
    for path, words in (("evil.pt", "damaged or not a checkpoint"), ("truncated.pt", "damaged"),
                        ("foreign.pt", "is not a vanilla_gan checkpoint"),
                        (run / "metrics.csv", "not a checkpoint"), ("no.pt", "missing")):
        for flags in ([*generate, path], ["--resume", path]):
            assert_refused(capsys, flags, words)
        with pytest.raises(vg.GanError, match=words):
            vg.load_generator(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("args, flag", [
    ("--lr 2e4", "--lr"), ("--epochs 0", "--epochs"), ("--device tpu", "--device")])
def test_a_mistyped_value_gets_argparse_usage_and_exit_2(capsys, args, flag):
    code, _, err = run_main(capsys, *args.split())
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("usage: vanilla_gan.py"), err
    assert last.startswith(f"vanilla_gan.py: error: argument {flag}"), last


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
        out = assert_refused(capsys, flags, "device check failed: cpu:0 is off the CPU by")
        assert "training" not in out and sides == [gpu, CPU] * 5
        return
    code, out, err = run_main(capsys, *flags)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"device cpu:0  torch {torch.__version__}"), err
    error = float(lines[1].split("matches the CPU to ")[1])
    assert lines[1].startswith("device check passed: cpu:0") and 0 < error <= vg.TOLERANCE
    rate = float(lines[2].split(" img/s")[0].split()[-1].replace(",", ""))
    assert "2 epochs of MNIST (1,200 steps) in " in lines[2]
    assert float(lines[2].split(" in ")[-1].split()[0]) == pytest.approx(2000 / rate, abs=0.06)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_absent_device_is_one_line_and_help_returns(capsys, data_root, tmp_path, monkeypatch):
    assert vg.main(["--help"]) == 0  # returned, not raised: a notebook survives it
    assert "--check-device" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    for device, seen in (("cuda", torch.cuda.is_available()),
                         ("mps", torch.backends.mps.is_available())):
        for flags in [] if seen else (["--device", device], ["--check-device", "--device", device]):
            assert_refused(capsys, flags, f"no {device} here: torch {torch.__version__}")
    assert_refused(capsys, ["--data-dir", data_root, "--batch-size", 513], "513: only 512 images")
    assert list(tmp_path.iterdir()) == []  # refused before a run folder was made


def test_each_tutorial_setup_trains_and_generates_by_name(capsys, data_root, tmp_path):
    for name, setup in vg.CONFIGS.items():
        run = tmp_path / name  # each by its name alone, then generated with no model flag
        assert run_main(capsys, "--config", name, "--data-dir", data_root, "--out-dir", run,
                        "--max-steps", 2)[0] == 0
        code, out, err = run_main(capsys, "--generate", 4, "--checkpoint", run, "--out",
                                  run / "g.png")
        assert code == 0 and "at step 2" in out, err
        checkpoint = load(run / "checkpoint.pt")
        G, D = vg.load_generator(run), vg.Discriminator(setup["d_hidden"], 0)
        assert {k: checkpoint["args"][k] for k in setup if k != "epochs"} == {
            k: v for k, v in setup.items() if k != "epochs"}, name
        assert G.latent_dim == setup["latent_dim"] and D.load_state_dict(checkpoint["D"])
        widths = [m.out_features for m in G.net if hasattr(m, "out_features")]
        assert widths == setup["g_hidden"] + [784] and ("BatchNorm1d" in kinds(G)) == (
            setup["g_batchnorm"]), name
    assert vg.parse_args(["--config", "deep", "--lr", "1e-3"]).lr == 1e-3  # typed flags win
    assert vg.parse_args(["--config", "shallow", "--batch-size", "128"]).batch_size == 128


def test_a_folder_of_your_own_images_trains_resumes_and_generates_in_colour(capsys, tmp_path):
    folder = tmp_path / "images"  # odd-sized grey PNGs and colour JPEGs, nested, a broken file
    for i in range(40):
        sub = folder / ("grey" if i % 2 else "colour/deep")
        sub.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(torch.randint(0, 256, (30 + i, 40, 3), dtype=torch.uint8).numpy())
        image.convert("L" if i % 2 else "RGB").save(sub / f"{i}{'.png' if i % 2 else '.JPG'}")
    (folder / "grey" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    pixels = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)  # read back exactly
    (folder / "exact").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image.numpy()).save(folder / "exact" / f"{i}.png")
    assert torch.equal(vg.read_folder(folder / "exact", 3, 28), pixels.permute(0, 3, 1, 2))
    base = ["--dataset", "folder", "--data-dir", folder, "--batch-size", 16, "--device", "cpu"]
    code, out, err = run_main(capsys, *base, "--out-dir", tmp_path / "grey", "--max-steps", 1)
    assert code == 0 and "42 images, run folder" in out, err  # the broken file skipped
    run = tmp_path / "rgb"
    flags = ["--channels", 3, "--image-size", 32, "--out-dir", run, "--max-steps", 2]
    assert run_main(capsys, *base, *flags)[0] == 0
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", run, "--out", run / "g.png")
    image = Image.open(run / "g.png")
    assert code == 0 and image.mode == "RGB" and image.size == (2 * 34 + 2, 2 * 34 + 2), err
    assert vg.load_generator(run)(torch.randn(2, 100)).shape == (2, 3, 32, 32)
    assert_refused(capsys, ["--resume", run, "--image-size", 28], "--image-size 32, not 28")
    for path in sorted(folder.rglob("*.JPG"))[:2]:  # the grey run stopped mid-epoch; then
        path.unlink()  # the folder changed
    assert_refused(capsys, ["--resume", tmp_path / "grey"], "epoch has 42 images", "40: put")
    (tmp_path / "empty").mkdir()  # a folder whose only image is broken
    shutil.copy(folder / "grey" / "broken.png", tmp_path / "empty")
    for data_dir, flags, words in ((tmp_path / "empty", [], "no readable images in"),
                                   (tmp_path / "typo", [], "no folder"),
                                   (folder, ["--out-dir", folder / "run"], "inside --data-dir")):
        assert_refused(capsys, [*base, "--data-dir", data_dir, "--max-steps", 1, *flags], words)


def test_the_readme_sets_up_a_venv_and_its_python_blocks_run_in_order(tmp_path):
    """The set-up activates the venv; after a run, the blocks run as written in one notebook: the
    trained-G block, then the training block twice."""
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
    first = "import vanilla_gan\nassert vanilla_gan.main(['--max-steps', '2']) == 0\n"
    (tmp_path / "notebook.py").write_text(
        here + first + blocks[0] + blocks[1] + "\nassert code == 0\n" + blocks[1])
    proc = subprocess.run([sys.executable, "notebook.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [p for p in (tmp_path / "runs").iterdir() if not p.is_symlink()]
    assert len(runs) == 3 and all((p / "checkpoint.pt").exists() for p in runs)
    assert Image.open(tmp_path / "walk.png").size == (10 * 30 + 2, 32)  # a row of 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_check_exact_resume_and_amp(capsys, data_root, tmp_path):
    code, out, err = run_main(capsys, "--check-device", "--device", "cuda")
    assert code == 0 and "device check passed: cuda matches the CPU" in out, err
    assert "img/s" in out and "peak GPU memory" in out
    flags = ["--data-dir", data_root, "--device", "cuda", "--batch-size", 64, "--epochs", 3]
    for name, steps, *extra in (("a", 20), ("b", 12), ("amp", 5, "--amp")):
        code = run_main(capsys, *flags, "--out-dir", tmp_path / name, "--max-steps", steps, *extra)
        assert code[0] == 0, code
    code = run_main(capsys, "--resume", tmp_path / "b", "--device", "cuda", "--max-steps", 20)
    a, b = load(tmp_path / "a" / "checkpoint.pt"), load(tmp_path / "b" / "checkpoint.pt")
    assert code[0] == 0 and same_weights(a, b)
    code = run_main(capsys, "--resume", tmp_path / "a", "--device", "cpu", "--max-steps", 22)
    assert code[0] == 0  # a GPU's run goes on on the CPU

"""Tests for vanilla_gan.py, on small MNIST-format files that torchvision reads. MNIST_DIR, a
folder holding MNIST/raw/, gives the README's notebook block the real digits."""
import contextlib
import copy
import io
import json
import os
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
    return (vg.main(list(args)), *capsys.readouterr())


def cli(*args, **popen):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1", **OFFLINE)  # a real process
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def assert_refused(capsys, args, *words):
    """main(args) refuses in one line holding each of `words`: exit 1, no traceback."""
    code, _, err = run_main(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def same_weights(a, b, keys=("G", "D", "G_avg")):
    return all(a[k].keys() == b[k].keys() and all(map(torch.equal, a[k].values(), b[k].values()))
               for k in keys)


def kinds(net):
    return [type(m).__name__ for m in net.net]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(data_root, tmp_path_factory):
    """12 steps of a small real run with --amp, stopped in epoch 2, outside the main thread as
    Gradio runs it: (folder, output)."""
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
            seen.append((name, [p.grad.clone() for p in net.parameters()], copy.deepcopy(D)))
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


def test_fid_formula_the_quality_report_and_eval(capsys, tmp_path, monkeypatch):
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
    real, cpu = vg.to_unit_range(images[600:]), torch.device("cpu")  # as a perfect G draws
    fid_real, shares_real = vg.report_quality(real, "mnist", root, cpu)
    fid_noise, _ = vg.report_quality(torch.rand(500, 1, 28, 28) * 2 - 1, "mnist", root, cpu)
    fid_collapsed, shares = vg.report_quality(real[labels[600:] == 3], "mnist", root, cpu)
    assert capsys.readouterr().out.strip().endswith("of 60 samples: FID %.2f, rarest class 0 at "
                                                     "0.0%%" % fid_collapsed)
    assert fid_real * 10 < fid_noise and fid_real * 10 < fid_collapsed
    assert shares_real.min() > 0.09 and shares[3] == 1.0 and shares.sum() == 1.0
    run = tmp_path / "run"  # --eval after training, on --generate, and on a finished run
    monkeypatch.setattr(vg, "EVAL_SAMPLES", 1000)  # 10,000 by default
    code, out, err = run_main(capsys, "--data-dir", root, "--out-dir", run, "--eval",
                              "--max-steps", 8, *SMALL)
    assert code == 0 and "quality of 1000 samples: FID" in out, err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no data/ here: the run remembers its folder
    code, out, err = run_main(capsys, "--generate", 200, "--checkpoint", run, "--eval")
    assert code == 0 and "quality of 200 samples: FID" in out, err
    code, out, err = run_main(capsys, "--resume", run, "--max-steps", 8, "--eval")
    assert code == 0 and "nothing to train" in out and "quality of 1000 samples" in out, err
    moved = shutil.move(root, tmp_path / "moved")  # the remembered folder is gone
    for flags in (["--resume", run], ["--generate", 200, "--checkpoint", run, "--eval"]):
        assert_refused(capsys, flags, f"the run's data folder {root} is gone", "--data-dir")
    assert not root.exists()  # nothing downloaded into it
    code, out, err = run_main(capsys, "--resume", run, "--data-dir", moved, "--max-steps", 9)
    assert code == 0 and "done: 9 steps" in out, err


def test_missing_or_damaged_data_is_one_line_naming_the_folder(capsys, tmp_path, monkeypatch):
    for name, value in OFFLINE.items():  # downloading fails at once
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "typo" / "data"
    assert_refused(capsys, ["--data-dir", typo], f"load mnist from {typo / 'MNIST' / 'raw'}: ",
                   "train-images")
    assert list(tmp_path.iterdir()) == []  # no folder made, no run folder
    images = write_dataset(tmp_path / "d") / "MNIST" / "raw" / "train-images-idx3-ubyte"
    for content in (images.read_bytes()[:5000], b"<html><body>404 Not Found</body></html>", b""):
        images.write_bytes(content)  # truncated, an error page saved as the file, empty
        with pytest.raises(vg.GanError, match=f"load mnist from {images.parent}: .+"):
            vg.load_dataset("mnist", tmp_path / "d")
    for name, folder in (("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")):
        write_dataset(tmp_path, folder, n_train=20)
        assert vg.load_dataset(name, tmp_path)[0].shape == (20, 1, 28, 28)


def test_a_smoke_run_leaves_every_output(trained, tmp_path):
    run, out = trained
    for name in ("samples/epoch_001.png", "samples/step_0000012.png", "losses.png",
                 "metrics.csv", "checkpoint.pt", "flags.json"):
        assert (run / name).stat().st_size > 0, name
    assert not list(run.rglob(".*.tmp"))
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,Loss_D,Loss_G,D(x),D(G(z)),images_per_s"
    assert [row.split(",")[:2] for row in rows[1:]] == [["1", "3"], ["1", "6"], ["2", "9"],
                                                         ["2", "12"]]
    for words in ("[2/3][4/8] step 12  Loss_D", "epoch 1/3 done: mean Loss_D", "amp True",
                  "device cpu  torch", "512 images", "epoch 2/3 stopped"):
        assert words in out, words
    checkpoint = load(run / "checkpoint.pt")
    assert checkpoint["step"] == 12 and checkpoint["epoch"] == 1 and checkpoint["done"] == 4 * 64
    order = checkpoint["order"]  # shuffled each epoch
    assert torch.equal(order.sort().values, torch.arange(512)) and order[0] != 0
    flags = checkpoint["args"]
    assert not {"device", "amp", "eval", "max_steps", "out_dir", "config"} & flags.keys()
    assert json.loads((run / "flags.json").read_text()) == flags and json.dumps(flags) in out
    assert not same_weights(checkpoint, {**checkpoint, "G_avg": checkpoint["G"]})  # the EMA
    G = vg.load_generator(run)  # the last grid: the averaged G on the fixed noise
    vg.save_grid(vg.sample(G, checkpoint["fixed_noise"]), tmp_path / "grid.png")
    assert Image.open(run / "samples/step_0000012.png").tobytes() == \
        Image.open(tmp_path / "grid.png").tobytes()
    blue = []  # the first curve's colour, C0: beyond the legend's, one logged row shows a dot
    for rows in ([], [{"epoch": 1, "step": 3, **dict(zip(vg.STATS, (0.2, 0.7, 1.2, 1.7)))}]):
        vg.plot_losses(rows, 8, tmp_path / "plot.png")
        png = Image.open(tmp_path / "plot.png").convert("RGB").tobytes()
        pixels = torch.frombuffer(bytearray(png), dtype=torch.uint8).view(-1, 3).int()
        blue.append(((pixels - torch.tensor([31, 119, 180])).abs().sum(1) < 30).sum().item())
    assert blue[1] > blue[0] + 10, blue


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


def test_resume_keeps_the_run_and_lets_length_lr_and_logging_change(capsys, run_copy,
                                                                    tmp_path):
    before = (run_copy / "checkpoint.pt").read_bytes()
    for flags, words in ((["--d-dropout", 0.5], "the run has --d-dropout 0.3, not 0.5"),
                         (["--dataset", "kmnist"], "--dataset mnist, not kmnist"),
                         (["--g-hidden", 64, 64], "--g-hidden [256, 512, 1024], not [64, 64]"),
                         (["--config", "classic"], "the run has --batch-size 64, not 128"),
                         (["--seed", 1], "--seed 42, not 1")):
        assert_refused(capsys, ["--resume", run_copy, *flags], words, "a resume keeps it")
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    moved = run_copy.rename(run_copy.parent / "moved")  # a moved run resumes where it is now
    code, out, err = run_main(capsys, "--resume", moved / "checkpoint.pt", "--log-every", 5)
    assert code == 0 and f"run folder {moved}" in out and "done: 24 steps" in out, err
    assert "[3/3][4/8] step 20" in out and "step 18" not in out  # every 5 steps now
    code, out, err = run_main(capsys, "--resume", moved, "--out-dir", tmp_path / "new")
    assert code == 0 and "nothing to train" in out, err
    assert load(tmp_path / "new" / "checkpoint.pt")["step"] == 24  # a finished copy, claimed
    before = (moved / "checkpoint.pt").read_bytes()
    assert_refused(capsys, ["--resume", moved, "--lr", 1e30, "--epochs", 4], "diverged by step 32")
    assert (moved / "checkpoint.pt").read_bytes() == before  # nothing saved


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_a_stopped_run_resumes_where_an_unstopped_one_ends(capsys, data_root, tmp_path, stop):
    run, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["--data-dir", data_root, *SMALL, "--log-every", 1, "--epochs", 1000]
    proc = cli(*flags, "--out-dir", run,  # SIGINT not ignored, as in a terminal
               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    next(line for line in proc.stdout if "step 17 " in line)  # epoch 2's checkpoint is saved
    proc.send_signal(signal.SIGINT if stop == "ctrl-c" else signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    step = load(run / "checkpoint.pt")["step"]
    assert step % 8 == 0 and step >= 16
    if stop == "ctrl-c":
        assert proc.returncode == 130 and "Traceback" not in err and not list(run.rglob(".*.tmp"))
        assert f"resume from step {step}: python vanilla_gan.py --resume {run}" in out
    for steps in (step + 3, step + 6):  # at an epoch's end, then mid-epoch
        assert run_main(capsys, "--resume", run, "--max-steps", steps)[0] == 0
    assert run_main(capsys, *flags, "--out-dir", straight, "--max-steps", step + 6)[0] == 0
    a, b = load(run / "checkpoint.pt"), load(straight / "checkpoint.pt")
    assert a["step"] == step + 6 and same_weights(a, b)
    losses = [[[row[k] for k in ("step", *vg.STATS)] for row in c["metrics"]] for c in (a, b)]
    assert torch.equal(a["fixed_noise"], b["fixed_noise"]) and losses[0] == losses[1]


def test_a_folder_holds_one_run_and_a_failed_write_loses_nothing(capsys, data_root, trained,
                                                                 run_copy, tmp_path, monkeypatch):
    before = (run_copy / "checkpoint.pt").read_bytes()
    assert_refused(capsys, ["--data-dir", data_root, "--out-dir", run_copy, *SMALL],
                   "already holds a run", f"--resume {run_copy}")
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    flags = vars(vg.parse_args([]))
    run = vg.new_run(flags, torch.device("cpu"))
    vg.save_checkpoint(run, flags, tmp_path, exclusive=True)  # of two claims at once, one fails
    with pytest.raises(FileExistsError):
        vg.save_checkpoint(run, flags, tmp_path, exclusive=True)

    def torn_save(obj, f):  # killed while claiming: half a file
        f.write(b"PK\x03\x04 half")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(RuntimeError):
        vg.main(["--data-dir", data_root, "--out-dir", tmp_path / "torn", *SMALL])
    monkeypatch.undo()
    assert list((tmp_path / "torn").iterdir()) == [tmp_path / "torn" / "samples"]  # claimable
    args = ["--data-dir", data_root, "--out-dir", tmp_path / "torn", "--max-steps", 1, *SMALL]
    assert run_main(capsys, *args)[0] == 0
    if Path("/dev/full").exists():  # the kernel's own "No space left on device"
        tmp = run_copy / f".checkpoint.pt.{os.getpid()}.tmp"
        tmp.symlink_to("/dev/full")
        assert_refused(capsys, ["--resume", run_copy], "No space left")
        assert not tmp.exists() and (run_copy / "checkpoint.pt").read_bytes() == before


class Payload:
    def __reduce__(self):  # unpickling this would call Path.touch("pwned")
        return (Path.touch, (Path("pwned"),))


def test_generate_a_grid_or_a_tensor_and_refuse_what_is_not_ours(capsys, trained, tmp_path,
                                                                monkeypatch):
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
    assert Image.open(run / "generated.png").size == (4 * 30 + 2, 4 * 30 + 2)  # beside it
    generate = ["--generate", 4, "--checkpoint"]
    assert_refused(capsys, [*generate, run, "--g-hidden", 64], "[256, 512, 1024], not [64]")
    assert_refused(capsys, [*generate, run, "--out", tmp_path / "x"], "x: end it in .png, .jpg")
    assert_refused(capsys, [*generate, run, "--out", tmp_path / "no" / "x.pt"], "no folder")
    before = [path.read_bytes() for path in sorted(run.rglob("*.*"))]
    source = shutil.copy(run / "checkpoint.pt", tmp_path / "copy.pt")  # a copy elsewhere too
    for out in (*(run / own for own in ("checkpoint.pt", "losses.png", "metrics.csv",
                                        "flags.json", "samples/x.png")), source):
        assert_refused(capsys, [*generate, source, "--out", out], "is for a run's own files")
    assert [path.read_bytes() for path in sorted(run.rglob("*.*"))] == before
    code, _, err = run_main(capsys, *generate, run, "--out", tmp_path / "losses.png")  # no run
    assert code == 0 and Image.open(tmp_path / "losses.png").size == (2 * 30 + 2,) * 2, err
    monkeypatch.chdir(tmp_path)
    torch.save({"args": {}, "G_avg": Payload()}, tmp_path / "evil.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000])
    for path, words in (("evil.pt", "damaged or not a checkpoint"), ("truncated.pt", "damaged"),
                        ("foreign.pt", "is not a vanilla_gan checkpoint"),
                        (run / "metrics.csv", "not a checkpoint"), ("no.pt", "no checkpoint")):
        for flags in ([*generate, path], ["--resume", path]):
            assert_refused(capsys, flags, words)
        with pytest.raises(vg.GanError, match=words):
            vg.load_generator(path)
    assert not (tmp_path / "pwned").exists()
    old = load(run / "checkpoint.pt")  # a run from before --g-activation and --g-batchnorm
    del old["args"]["g_activation"], old["args"]["g_batchnorm"]
    torch.save(old, tmp_path / "old.pt")
    assert torch.equal(vg.sample(vg.load_generator(tmp_path / "old.pt"), z), a)


@pytest.mark.parametrize("args, flag", [
    ("--epochs 0", "--epochs"), ("--lr nan", "--lr"), ("--batch-size x", "--batch"),
    ("--d-dropout 1", "--d-dropout"), ("--device tpu", "cuda:N"), ("--config big", "--config"),
    ("--generate 4", "--checkpoint"), ("--out x.png", "--generate"), ("--image-size 32", "folder"),
    ("--check-device --resume x", "not allowed"), ("--dataset folder --eval", "--eval"),
    ("--seed 99999999999999999999", "--seed")])
def test_a_bad_flag_gets_argparse_usage_and_exit_2(capsys, args, flag):
    code, _, err = run_main(capsys, *args.split())
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("usage: vanilla_gan.py"), err
    assert last.startswith("vanilla_gan.py: error: ") and flag in last, last


def test_help_device_check_run_folders_and_a_missing_gpu(capsys, data_root, tmp_path,
                                                         monkeypatch):
    assert vg.main(["--help"]) == 0  # returned, not raised: a notebook survives it
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--config {shallow,classic,deep,batchnorm}", "cuda:N or mps",
                  "--epochs EPOCHS passes over the data (default: 50)", "--check-device"):
        assert words in text, words
    monkeypatch.chdir(tmp_path)
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    for flags in (["--device", device], ["--check-device", device]):
        assert_refused(capsys, flags, f"no {device} here: torch {torch.__version__}")
    if not torch.backends.mps.is_available():  # no Apple GPU: one line too
        assert_refused(capsys, ["--device", "mps"], "no mps here")
    assert_refused(capsys, ["--data-dir", data_root, "--batch-size", 513], "513: only 512 images")
    monkeypatch.setattr(vg, "CHECK_SECONDS", 0.5)  # the CPU's check: its speed, nothing written
    code, out, err = run_main(capsys, "--check-device", "cpu", "--batch-size", 100, "--epochs", 2)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"device cpu  torch {torch.__version__}"), err
    rate = float(lines[1].split(" img/s")[0].split()[-1].replace(",", ""))
    assert "2 epochs of MNIST (1,200 steps) in " in lines[1]
    assert float(lines[1].split(" in ")[-1].split()[0]) == pytest.approx(2000 / rate, abs=0.06)
    assert list(tmp_path.iterdir()) == []  # refused or checked before a run folder was made
    for _ in range(3):  # runs started in the same second get folders of their own
        assert vg.main(["--data-dir", data_root, "--max-steps", 1, *SMALL]) == 0
    mask = os.umask(0)
    os.umask(mask)
    folders = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert len(folders) == 3 and {p.stat().st_mode & 0o777 for p in folders} == {0o777 & ~mask}
    if (tmp_path / "runs" / "latest").is_symlink():  # where links work: the newest
        newest = max(folders, key=lambda p: p.stat().st_mtime_ns)
        assert (tmp_path / "runs" / "latest").resolve() == newest.resolve()


@pytest.mark.parametrize("how", ["rounding", "wrong layer", "wrong update", "nan"])
def test_device_check_passes_rounding_and_fails_a_wrong_layer_update_or_nan(monkeypatch, how):
    flags, real_step, calls = vars(vg.parse_args(["--batch-size", "16"])), vg.train_step, []

    def device_side(G, D, opt_G, opt_D, real, z):
        calls.append(1)
        on_device = len(calls) % 2 == 1  # each batch on the device, then on the CPU
        if on_device and how == "rounding":  # ten times float32's rounding differences
            real = real * (1 + 1e-6 * torch.randn(real.shape))
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
    error = vg.compare_with_cpu(flags, torch.device("cpu"))
    assert (error <= vg.TOLERANCE) == (how == "rounding"), error


def test_each_tutorial_setup_trains_and_generates_by_name(capsys, data_root, tmp_path):
    table = {"shallow": (100, [128], "relu", False, [128], 64, 100, 2e-4),
             "classic": (100, [256, 512], "leaky-relu", False, [512, 256], 128, 50, 2e-4),
             "deep": (100, [256, 512, 1024], "relu", False, [1024, 512, 256], 128, 20, 2e-4),
             "batchnorm": (64, [128, 256, 512, 1024], "relu", True, [1024, 512, 256], 128, 500,
                           1e-5)}
    names = ("latent_dim", "g_hidden", "g_activation", "g_batchnorm", "d_hidden", "batch_size",
             "epochs", "lr")
    hidden = {"shallow": ["ReLU"], "classic": ["LeakyReLU"] * 2, "deep": ["ReLU"] * 3,
              "batchnorm": ["BatchNorm1d", "ReLU"] * 4}
    for name, row in table.items():
        args = vg.parse_args(["--config", name])
        assert [getattr(args, flag) for flag in names] == list(row), name
        assert args.d_dropout == 0 and args.ema_decay == 0, name
        run = tmp_path / name  # each by its name alone, then generated with no model flag
        assert run_main(capsys, "--config", name, "--data-dir", data_root, "--out-dir", run,
                        "--max-steps", 2)[0] == 0
        code, out, err = run_main(capsys, "--generate", 4, "--checkpoint", run)
        assert code == 0 and "at step 2" in out, err
        G = vg.load_generator(run)
        assert [kind for kind in kinds(G) if kind != "Linear"] == hidden[name] + ["Tanh"], name
    assert vg.parse_args(["--config", "deep", "--lr", "1e-3"]).lr == 1e-3  # typed flags win,
    assert vg.parse_args(["--config", "shallow", "--batch-size", "128"]).batch_size == 128  # all
    before = (tmp_path / "shallow" / "checkpoint.pt").read_bytes()
    assert_refused(capsys, ["--resume", tmp_path / "shallow", "--config", "deep"],
                   "the run has --batch-size 64, not 128")
    assert (tmp_path / "shallow" / "checkpoint.pt").read_bytes() == before


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
    assert code == 0 and "42 images, run folder" in out, err
    assert f"1 unreadable, skipped, e.g. {folder / 'grey' / 'broken.png'}" in out
    run = tmp_path / "rgb"
    flags = ["--channels", 3, "--image-size", 32, "--out-dir", run, "--max-steps", 2]
    assert run_main(capsys, *base, *flags)[0] == 0
    code, _, err = run_main(capsys, "--generate", 4, "--checkpoint", run)
    image = Image.open(run / "generated.png")
    assert code == 0 and image.mode == "RGB" and image.size == (2 * 34 + 2, 2 * 34 + 2), err
    assert vg.load_generator(run)(torch.randn(2, 100)).shape == (2, 3, 32, 32)
    before = (run / "checkpoint.pt").read_bytes()
    for flags, words in ((["--image-size", 28], "--image-size 32, not 28"),
                         (["--dataset", "mnist"], "the run has --dataset folder, not mnist")):
        assert_refused(capsys, ["--resume", run, *flags], words)
    assert (run / "checkpoint.pt").read_bytes() == before
    for path in sorted(folder.rglob("*.JPG"))[:2]:  # the grey run stopped mid-epoch; then
        path.unlink()  # the folder changed
    assert_refused(capsys, ["--resume", tmp_path / "grey"], "epoch has 42 images", "40: put")
    (tmp_path / "empty").mkdir()  # a folder whose only image is broken
    shutil.copy(folder / "grey" / "broken.png", tmp_path / "empty")
    for data_dir, flags, words in ((tmp_path / "empty", [], "no readable images in"),
                                   (folder, ["--out-dir", folder / "run"], "inside --data-dir")):
        assert_refused(capsys, [*base, "--data-dir", data_dir, "--max-steps", 1, *flags], words)


def test_the_readme_sets_up_a_venv_and_its_python_blocks_run_as_written(tmp_path):
    """The set-up activates the venv; the notebook block runs twice on MNIST or stand-ins, then
    the trained-G block on the newest run."""
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
    for script in ("notebook.py", "both.py"):  # the notebook block twice, then the other one
        proc = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [p for p in (tmp_path / "runs").iterdir() if not p.is_symlink()]
    assert len(runs) == 2 and all((p / "checkpoint.pt").exists() for p in runs)
    assert Image.open(tmp_path / "walk.png").size == (10 * 30 + 2, 32)  # a row of 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_check_exact_resume_amp_and_tf32_restored(capsys, data_root, tmp_path):
    torch.set_float32_matmul_precision("highest")
    code, out, err = run_main(capsys, "--check-device", "cuda")
    assert code == 0 and "device check passed: cuda matches the CPU" in out, err
    assert "img/s" in out and "peak GPU memory" in out
    assert torch.get_float32_matmul_precision() == "highest"  # TF32 off again after main()
    flags = ["--data-dir", data_root, "--device", "cuda", "--batch-size", 64, "--epochs", 3]
    for name, steps, *extra in (("a", 20), ("b", 12), ("amp", 5, "--amp")):
        code = run_main(capsys, *flags, "--out-dir", tmp_path / name, "--max-steps", steps, *extra)
        assert code[0] == 0, code
    code = run_main(capsys, "--resume", tmp_path / "b", "--device", "cuda", "--max-steps", 20)
    a, b = load(tmp_path / "a" / "checkpoint.pt"), load(tmp_path / "b" / "checkpoint.pt")
    assert code[0] == 0 and same_weights(a, b)
    code = run_main(capsys, "--resume", tmp_path / "a", "--device", "cpu", "--max-steps", 22)
    assert code[0] == 0  # a GPU's run goes on on the CPU

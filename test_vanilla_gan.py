"""Tests for vanilla_gan.py. Datasets are small MNIST-format files written here and read by torchvision;
one small trained run (a session fixture) serves the tests that need a checkpoint. MNIST_DIR, a folder
holding MNIST/raw/, adds the real digits: the README's notebook block then runs on them."""
import contextlib
import errno
import gzip
import io
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
SMALL = ["--batch-size", 64, "--log-every", 3, "--device", "cpu", "--epochs", 3]  # 512 images: 8 steps an epoch


# ---- Helpers: MNIST-format files, the CLI in this process and in a subprocess -----------------------
def write_idx(path, tensor, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{tensor.dim()}I", *tensor.shape))
        f.write(tensor.contiguous().numpy().tobytes())


def write_dataset(root, folder="MNIST", n_train=512, n_test=64, labelled=False):
    """Stand-in digits: a bar at a random place, or (labelled) class k's square at its own place."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n) % 10
        for i, k in enumerate(labels.tolist()):
            if labelled:
                r, c = 2 + (k // 5) * 13 + torch.randint(0, 3, (1,), generator=gen).item(), 1 + (k % 5) * 5
                images[i, r:r + 8, c:c + 4] = torch.randint(180, 256, (1,), generator=gen).item()
            else:
                r, c = torch.randint(2, 18, (2,), generator=gen).tolist()
                images[i, r:r + 8, c:c + 3] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8), 2049)
    return Path(root)


def run_main(capsys, *args):
    """The CLI in this process: no interpreter start-up, the same code below main()."""
    code = vg.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cli(*args, **popen):
    """The CLI in a real process, offline."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1", **OFFLINE)
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def assert_refused(code, err, expected_code, *words):
    """A foreseen refusal: one line, the exit code, no traceback."""
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def assert_argparse_error(code, err, *words):
    """argparse's own refusal: its usage line, then its error, exit code 2."""
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("usage: vanilla_gan.py") and last.startswith("vanilla_gan.py: error: "), err
    for word in words:
        assert word in last, last


def load(path):
    return torch.load(path, weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(data_root, tmp_path_factory):
    """One small real training run: 12 steps, stopped part-way through epoch 2. Returns (folder, output)."""
    run, out = tmp_path_factory.mktemp("trained") / "run", io.StringIO()
    with contextlib.redirect_stdout(out):
        assert vg.main(["--data-dir", data_root, "--out-dir", run, "--max-steps", 12, *SMALL]) == 0
    return run, out.getvalue()


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run, for a test to change."""
    return shutil.copytree(trained[0], tmp_path / "run")


# ---- The GAN ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 64])
def test_shapes_ranges_and_logits(n):
    G, D = vg.Generator(), vg.Discriminator()
    images = G(torch.randn(n, 100) * 1e4)  # extreme noise: Tanh still bounds the images
    assert images.shape == (n, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        D.net[-1].bias.fill_(50.0)  # a probability could never exceed 1
    assert D(images).shape == (n, 1) and (D(images) > 1).all()
    assert vg.to_unit_range(torch.tensor([[0, 255]], dtype=torch.uint8)).tolist() == [[[-1.0, 1.0]]]


def test_train_step_updates_everything_with_one_d_pass_per_update():
    torch.manual_seed(0)
    G, D = vg.Generator(), vg.Discriminator()
    opt_G, opt_D = vg.make_optimizer(G), vg.make_optimizer(D)
    before = [p.clone() for p in [*G.parameters(), *D.parameters()]]
    batch_sizes, d_grads = [], []
    D.register_forward_hook(lambda module, inputs, output: batch_sizes.append(len(inputs[0])))
    d_step = opt_D.step
    opt_D.step = lambda: (d_grads.extend(p.grad.clone() for p in D.parameters()), d_step())
    stats = vg.train_step(G, D, opt_G, opt_D, torch.rand(16, 1, 28, 28) * 2 - 1, torch.randn(16, 100))
    assert stats.shape == (4,) and torch.isfinite(stats).all()
    assert batch_sizes == [32, 16]  # real and fake together for D, the same fakes once more for G
    assert all(torch.equal(g, p.grad) for g, p in zip(d_grads, D.parameters()))  # no D grads in G's step
    assert all(not torch.equal(a, b) for a, b in zip(before, [*G.parameters(), *D.parameters()]))
    assert all(p.requires_grad for p in D.parameters())


def test_generator_learns_a_single_pattern():
    """Every real image is the same pattern: a few hundred steps pull G's samples to it."""
    torch.manual_seed(0)
    pattern = torch.full((28, 28), -1.0)
    pattern[6:22, 12:16] = 1.0
    G, D = vg.Generator(hidden=(256, 512)), vg.Discriminator()
    opt_G, opt_D, z = vg.make_optimizer(G), vg.make_optimizer(D), torch.randn(256, 100)
    start = (vg.sample(G, z) - pattern).pow(2).mean().item()
    for _ in range(300):
        vg.train_step(G, D, opt_G, opt_D, pattern.expand(64, 1, 28, 28), torch.randn(64, 100))
    assert (vg.sample(G, z) - pattern).pow(2).mean().item() < 0.25 * start


@pytest.mark.parametrize("decay", [0.9, 0])
def test_the_averaged_generator_is_the_ema_of_g(decay):
    torch.manual_seed(0)
    G, D = vg.Generator(batchnorm=True), vg.Discriminator()
    opt_G, opt_D, ema = vg.make_optimizer(G), vg.make_optimizer(D), vg.EMA(G, decay)
    expected = {k: v.clone() for k, v in G.named_parameters()}
    pixels = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    for step, _ in enumerate(vg.train_epoch(G, D, opt_G, opt_D, pixels, 16, ema=ema), 1):  # 4 steps
        weight = min(decay, (1 + step) / (10 + step))  # warming up: 0.18, 0.25, 0.31, 0.36
        for name, value in G.named_parameters():
            expected[name] = weight * expected[name] + (1 - weight) * value.detach()
    averaged, live = ema.G.state_dict(), G.state_dict()
    for name in live:  # BatchNorm's statistics are copied, not averaged; at decay 0 the average is G itself
        if name not in expected or not decay:
            assert torch.equal(averaged[name], live[name]), name
        else:
            assert torch.allclose(averaged[name], expected[name], atol=1e-6), name
            assert not torch.equal(averaged[name], live[name]), name
    assert not any(p.requires_grad for p in ema.G.parameters())


def test_dropout_in_d_is_active_in_both_updates():
    torch.manual_seed(0)
    G, D = vg.Generator(), vg.Discriminator()  # the default rate
    rate, dropped = vg.build_parser().get_default("d_dropout"), []
    first = next(m for m in D.modules() if isinstance(m, torch.nn.Dropout))
    first.register_forward_hook(lambda m, i, out: dropped.append(((out == 0) & (i[0] != 0)).float().mean().item()))
    vg.train_step(G, D, vg.make_optimizer(G), vg.make_optimizer(D), torch.rand(64, 1, 28, 28) * 2 - 1,
                  torch.randn(64, 100))
    assert first.p == rate and len(dropped) == 2  # the D update's pass and the G update's
    assert all(abs(share - rate) < 0.05 for share in dropped), dropped
    assert not any(isinstance(m, torch.nn.Dropout) for m in vg.Discriminator(dropout=0).modules())


# ---- Data -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["kmnist", "fashion-mnist"])
def test_other_datasets_train_through_torchvision(capsys, tmp_path, dataset):
    root = tmp_path / "data"
    if dataset == "kmnist":
        write_dataset(root, folder="KMNIST", n_train=128)
    elif not FASHION_DEB.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist (.ci/run does)")
    else:  # Debian's files, unpacked where torchvision looks
        (root / "FashionMNIST" / "raw").mkdir(parents=True)
        for packed in FASHION_DEB.glob("*.gz"):
            (root / "FashionMNIST" / "raw" / packed.stem).write_bytes(gzip.decompress(packed.read_bytes()))
    code, out, err = run_main(capsys, "--dataset", dataset, "--data-dir", root, "--out-dir", tmp_path / "run",
                              "--max-steps", 2, *SMALL)
    assert code == 0, err
    assert f"dataset {dataset}: {128 if dataset == 'kmnist' else 60000} training images" in out


def test_missing_dataset_offline_in_a_real_process(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli("--data-dir", tmp_path / "empty", cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert_refused(proc.returncode, err, 1, "MNIST is not in", str(tmp_path / "empty" / "MNIST" / "raw"),
                   "could not be downloaded", "--data-dir")  # the reason's wording is torchvision's
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


# ---- A real training run, resume, stop requests -------------------------------------------------------
def test_a_smoke_run_leaves_every_output(trained):
    run, out = trained
    for name in ("samples/epoch_001.png", "samples/step_0000012.png", "samples/progress.gif", "losses.png",
                 "metrics.csv", "checkpoint.pt", "generator.pt"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "metrics.csv").read_text().splitlines()[0] == "epoch,step,Loss_D,Loss_G,D(x),D(G(z)),images_per_s"
    assert [row["step"] for row in load(run / "checkpoint.pt")["metrics"]] == [3, 6, 9, 12]
    assert "[2/3][4/8] step 12  Loss_D" in out and "epoch 1/3 done: mean Loss_D" in out
    assert "device cpu" in out and "512 training images" in out and "epoch 2/3 stopped" in out
    checkpoint = load(run / "checkpoint.pt")
    assert checkpoint["step"] == 12 and checkpoint["epoch"] == 1 and checkpoint["done"] == 4 * 64
    assert not {"device", "amp", "eval", "max_steps", "out_dir", "resume"} & checkpoint["args"].keys()
    torch.manual_seed(42)  # the weights moved away from their initialisation (G is built first after seeding)
    initial = vg.Generator().state_dict()
    assert all(not torch.equal(initial[k], checkpoint["G"][k]) for k in initial)


def test_resume_mid_epoch_is_exact_and_the_same_seed_gives_the_same_losses(capsys, data_root, run_copy, tmp_path):
    code, out, err = run_main(capsys, "--resume", run_copy, "--max-steps", 20)
    assert code == 0, err
    assert "resuming at step 12" in out
    code, _, err = run_main(capsys, "--data-dir", data_root, "--out-dir", tmp_path / "straight", "--max-steps", 20,
                            *SMALL)
    assert code == 0, err
    split, straight = load(run_copy / "checkpoint.pt"), load(tmp_path / "straight" / "checkpoint.pt")
    for name in ("G", "D", "G_avg"):
        assert same_weights(split[name], straight[name]), name
    losses = [[row[key] for key in ("step", *vg.STATS)] for row in straight["metrics"]]
    assert [[row[key] for key in ("step", *vg.STATS)] for row in split["metrics"]] == losses


def test_resume_keeps_the_run_flags_lets_typed_ones_win_and_refuses_another_shape(capsys, run_copy):
    code, _, err = run_main(capsys, "--resume", run_copy, "--g-hidden", 64, 512)
    assert_refused(code, err, 1, "Generator does not fit the model flags given now", "size mismatch")
    code, _, err = run_main(capsys, "--resume", run_copy / "checkpoint.pt", "--lr", 1e-3, "--max-steps", 14)
    assert code == 0, err
    checkpoint = load(run_copy / "checkpoint.pt")
    assert checkpoint["opt_G"]["param_groups"][0]["lr"] == 1e-3 and checkpoint["args"]["lr"] == 1e-3
    assert checkpoint["args"]["batch_size"] == 64 and checkpoint["step"] == 14  # the run's own batch size
    moved = run_copy.rename(run_copy.parent / "moved")  # a moved run resumes where it is now
    code, out, err = run_main(capsys, "--resume", moved)  # --max-steps did not come back: on to 3 epochs
    assert code == 0 and f"run folder {moved}" in out and "done: 24 steps" in out, err


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_request_saves_and_resume_finishes(capsys, data_root, tmp_path, sig, expected):
    run = tmp_path / "run"
    proc = cli("--data-dir", data_root, "--out-dir", run, *SMALL, "--epochs", 1000, "--log-every", 1)
    for line in proc.stdout:
        if "Loss_D" in line:  # training is under way
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == expected, err
    assert f"--resume {run}" in out and "Traceback" not in err
    step = load(run / "checkpoint.pt")["step"]
    grid = f"step_{step:07d}.png" if step % 8 else f"epoch_{step // 8:03d}.png"  # a grid of the last step
    assert step > 0 and (run / "samples" / grid).exists()
    code, _, err = run_main(capsys, "--resume", run, "--max-steps", step + 3)
    assert code == 0, err
    assert load(run / "checkpoint.pt")["step"] == step + 3


def test_a_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)
    with vg.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted, training would finish its step
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # put back as it was


def test_divergence_and_a_new_run_in_the_folder_are_refused_before_saving(capsys, data_root, run_copy):
    before = (run_copy / "checkpoint.pt").read_bytes()
    code, _, err = run_main(capsys, "--resume", run_copy, "--lr", 1e30)
    assert_refused(code, err, 1, "training diverged", "smaller --lr")
    code, _, err = run_main(capsys, "--data-dir", data_root, "--out-dir", run_copy, *SMALL)
    assert_refused(code, err, 1, "already holds a run", f"--resume {run_copy}")
    assert (run_copy / "checkpoint.pt").read_bytes() == before


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(capsys, run_copy, monkeypatch):
    before = (run_copy / "checkpoint.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):  # unforeseen here: Python's own traceback
        vg.main(["--resume", str(run_copy), "--max-steps", 13])
    assert (run_copy / "checkpoint.pt").read_bytes() == before and not list(run_copy.glob("*.tmp"))


# ---- Configurations and generating ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(vg.CONFIGS))
def test_each_config_trains_resumes_and_generates_with_no_other_flag(capsys, data_root, tmp_path, name):
    run = tmp_path / "run"
    code, _, err = run_main(capsys, "--config", name, "--latent-dim", 32, "--data-dir", data_root, "--out-dir", run,
                            "--max-steps", 2, "--device", "cpu")  # a flag typed beside --config wins
    assert code == 0, err
    code, _, err = run_main(capsys, "--resume", run, "--max-steps", 3)  # no flags: the run's own come back
    assert code == 0, err
    saved = load(run / "checkpoint.pt")["args"]
    assert saved == {**saved, **vg.CONFIGS[name], "latent_dim": 32}
    # one image: a BatchNorm generator in training mode could not even normalise a batch of one
    code, _, err = run_main(capsys, "--generate", 1, "--checkpoint", run, "--out", tmp_path / "one.pt")
    assert code == 0 and load(tmp_path / "one.pt").shape == (1, 1, 28, 28), err


def test_generate_a_grid_or_a_tensor_from_the_averaged_generator(capsys, trained, tmp_path):
    run, _ = trained
    for name, source, seed in (("a", run / "generator.pt", 1), ("b", run / "checkpoint.pt", 1), ("c", run, 2)):
        code, out, err = run_main(capsys, "--generate", 10, "--checkpoint", source, "--seed", seed,
                                  "--out", tmp_path / f"{name}.pt")
        assert code == 0 and f"wrote 10 images to {tmp_path / name}.pt" in out, err
    a, b, c = (load(tmp_path / f"{name}.pt") for name in "abc")
    assert a.shape == (10, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)  # both files hold the averaged G; the seed decides
    G = vg.Generator()
    G.load_state_dict(load(run / "checkpoint.pt")["G_avg"])
    assert torch.equal(a, vg.sample(G, torch.randn(10, 100, generator=torch.Generator().manual_seed(1))))
    code, _, err = run_main(capsys, "--generate", 16, "--checkpoint", run, "--device", "cpu")
    assert code == 0, err
    from PIL import Image
    assert Image.open(run / "generated.png").size == (4 * 30 + 2, 4 * 30 + 2)  # a square grid, beside the run


class Payload:
    def __reduce__(self):  # unpickling this would call Path.touch("pwned")
        return (Path.touch, (Path("pwned"),))


def test_files_that_are_not_our_checkpoints_are_refused_unread(capsys, trained, tmp_path, monkeypatch):
    run, evil = trained[0], tmp_path / "evil.pt"
    monkeypatch.chdir(tmp_path)
    torch.save({"args": {}, "G_avg": Payload()}, evil)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000])
    cases = ((evil, "could run code"), (tmp_path / "foreign.pt", "is not a vanilla_gan checkpoint"),
             (tmp_path / "truncated.pt", "damaged"), (run / "metrics.csv", "is not a vanilla_gan checkpoint"),
             (tmp_path / "missing.pt", "no checkpoint at"))
    for path, words in cases:
        for flags in (["--generate", 4, "--checkpoint", path], ["--resume", path]):
            assert_refused(*run_main(capsys, *flags)[::2], 1, words)
    assert not (tmp_path / "pwned").exists()


# ---- Mistakes: argparse's message (exit 2), or one line (exit 1) -----------------------------------------
@pytest.mark.parametrize("flag", ["--epochs", "--batch-size", "--lr", "--latent-dim", "--max-steps", "--generate"])
@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_non_positive_or_non_numeric_values(capsys, flag, value):
    assert_argparse_error(*run_main(capsys, f"{flag}={value}")[::2], f"argument {flag}", repr(value))


@pytest.mark.parametrize("args, words", [
    (["--device", "tpu"], ["--device", "'tpu'"]),
    (["--d-dropout", "1"], ["--d-dropout", "fraction in [0, 1)"]),
    (["--config", "huge"], ["--config", "'huge'"]),
    (["--generate", "4"], ["--generate needs --checkpoint"]),
    (["--generate", "4", "--checkpoint", "x", "--out", "x.gif"], ["--out", ".png, .jpg or .pt"]),
    (["--dataset", "fake", "--eval"], ["no quality report exists for random images"]),
])
def test_argument_errors(capsys, args, words):
    assert_argparse_error(*run_main(capsys, *args)[::2], *words)


def test_help_returns_0_and_a_typo_in_a_real_process_exits_2(capsys):
    assert vg.main(["--help"]) == 0 and "--checkpoint RUN" in capsys.readouterr().out  # a notebook survives it
    proc = cli("--epcohs", 1)
    _, err = proc.communicate(timeout=60)
    assert_argparse_error(proc.returncode, err, "unrecognized arguments: --epcohs")


def test_foreseen_refusals_are_one_line(capsys, data_root, tmp_path):
    (tmp_path / "file").write_text("")
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    cases = ((["--device", device], f"--device {device}: no such device"),
             (["--data-dir", tmp_path / "file"], "not a directory"),
             (["--data-dir", data_root, "--batch-size", 513], "larger than the dataset (512 images)"),
             (["--data-dir", data_root, "--out-dir", tmp_path / "file" / "run"], "cannot create the run folder"))
    for args, words in cases:
        assert_refused(*run_main(capsys, *args, "--max-steps", 1)[::2], 1, words)


# ---- The quality report ---------------------------------------------------------------------------------
def test_frechet_distance_of_a_gaussian_with_itself_is_zero_and_it_is_symmetric():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 8, generator=gen).double() @ torch.randn(8, 8, generator=gen).double()
    b = torch.randn(3000, 8, generator=gen).double() * 2 + 1
    assert abs(vg.frechet_distance(a, a)) < 1e-6
    assert vg.frechet_distance(a, b) == pytest.approx(vg.frechet_distance(b, a), rel=1e-6)
    x, y = a[:, :1], b[:, :1]  # in one dimension: (mu_x - mu_y)^2 + (sigma_x - sigma_y)^2
    assert vg.frechet_distance(x, y) == pytest.approx(((x.mean() - y.mean()) ** 2 + (x.std() - y.std()) ** 2).item())


def test_the_quality_report_tells_real_from_noise_and_a_collapse(capsys, tmp_path):
    root = write_dataset(tmp_path / "data", n_train=2000, n_test=500, labelled=True)
    images, labels = vg.load_dataset("mnist", root)
    real = vg.to_unit_range(images[1000:])  # real digits, as a perfect generator would draw them
    fid_real, shares_real = vg.report_quality(real, "mnist", root, torch.device("cpu"))
    fid_noise, _ = vg.report_quality(torch.rand(500, 1, 28, 28) * 2 - 1, "mnist", root, torch.device("cpu"))
    fid_collapsed, shares = vg.report_quality(real[labels[1000:] == 3], "mnist", root, torch.device("cpu"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("quality of 100 samples: FID") and last.endswith("rarest class 0 at 0.0%")
    assert fid_real * 10 < fid_noise and fid_real * 10 < fid_collapsed
    assert shares_real.min() > 0.09 and shares[3] == 1.0 and shares.sum() == 1.0


def test_eval_after_training_on_generate_and_on_a_finished_run(capsys, tmp_path, monkeypatch):
    root, run = write_dataset(tmp_path / "data", n_train=512, n_test=100, labelled=True), tmp_path / "run"
    code, out, err = run_main(capsys, "--data-dir", root, "--out-dir", run, "--eval", "--max-steps", 8, *SMALL)
    assert code == 0 and "quality of 10000 samples: FID" in out, err
    monkeypatch.chdir((tmp_path / "elsewhere").mkdir() or tmp_path / "elsewhere")  # no data/ here
    code, out, err = run_main(capsys, "--generate", 50, "--checkpoint", run, "--eval")  # the run's data folder
    assert code == 0 and "quality of 50 samples: FID" in out, err
    (tmp_path / "file").write_text("")
    code, _, err = run_main(capsys, "--generate", 50, "--checkpoint", run, "--eval", "--data-dir", tmp_path / "file")
    assert_refused(code, err, 1, "not a directory")  # a typed --data-dir wins
    code, out, err = run_main(capsys, "--resume", run, "--epochs", 1, "--eval")
    assert code == 0 and "resuming at step 8" in out and "quality of 10000 samples" in out, err


# ---- The device check, the notebook, CUDA -----------------------------------------------------------------
def test_device_check_names_a_perturbed_step(monkeypatch, capsys):
    real_step, calls = vg.train_step, []

    def one_wrong_step(G, D, *rest):  # the device side runs first: its third step goes wrong
        calls.append(1)
        with torch.no_grad():
            G.net[0].weight[0, 0] += 0.5 * (len(calls) == 3)
        return real_step(G, D, *rest)

    args = vg.parse_args(["--dataset", "fake", "--batch-size", "16", "--g-hidden", "32", "--d-hidden", "32"])[0]
    vg.device_check(args, torch.device("cpu"), steps=5)
    assert "device check passed: cpu matches the CPU to 0e+00 over 5 steps" in capsys.readouterr().out
    monkeypatch.setattr(vg, "train_step", one_wrong_step)
    with pytest.raises(vg.GanError, match="device check failed: losses or weights on cpu differ from the CPU's by"):
        vg.device_check(args, torch.device("cpu"), steps=5)


def test_random_images_on_the_cpu_train_without_a_device_check(capsys, tmp_path):
    code, out, err = run_main(capsys, "--dataset", "fake", "--out-dir", tmp_path / "run", "--max-steps", 2, *SMALL)
    assert code == 0, err
    assert "dataset fake: 60000 training images (random pixels)" in out and "device check" not in out


def test_the_readme_notebook_block_runs_as_written(tmp_path):
    """The README's notebook example, read from README.md, run with MNIST (or small stand-in files) in ./data."""
    readme = (SCRIPT.parent / "README.md").read_text()
    block = readme.split("## Use it from a notebook", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    if os.environ.get("MNIST_DIR"):
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "MNIST").symlink_to((Path(os.environ["MNIST_DIR"]) / "MNIST").resolve())
    else:
        write_dataset(tmp_path / "data", n_train=2048)
    (tmp_path / "notebook.py").write_text(f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r})\n" + block)
    proc = subprocess.run([sys.executable, "notebook.py"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "notebook_grid.png").is_file() and (tmp_path / "runs" / "notebook" / "checkpoint.pt").is_file()


@cuda
def test_device_check_on_cuda_then_generate_and_resume_on_the_cpu(capsys, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_main(capsys, "--dataset", "fake", "--device", "cuda", "--out-dir", run, "--max-steps", 30)
    assert code == 0 and "device check passed: cuda matches the CPU" in out, err
    code, _, err = run_main(capsys, "--generate", 8, "--checkpoint", run, "--device", "cpu", "--out", tmp_path / "x.pt")
    assert code == 0, err
    code, out, err = run_main(capsys, "--resume", run, "--device", "cpu", "--max-steps", 32)
    assert code == 0 and "device cpu" in out, err


@cuda
def test_cuda_resume_is_exact_and_amp_trains(capsys, data_root, tmp_path):
    flags = ["--data-dir", data_root, "--device", "cuda", "--batch-size", 64, "--epochs", 3]
    for name, steps, *extra in (("a", 20), ("b", 12), ("amp", 5, "--amp")):
        assert run_main(capsys, *flags, "--out-dir", tmp_path / name, "--max-steps", steps, *extra)[0] == 0
    assert run_main(capsys, "--resume", tmp_path / "b", "--device", "cuda", "--max-steps", 20)[0] == 0
    a, b = load(tmp_path / "a" / "checkpoint.pt"), load(tmp_path / "b" / "checkpoint.pt")
    assert all(same_weights(a[name], b[name]) for name in ("G", "D", "G_avg"))

"""A vanilla GAN (Goodfellow et al., 2014) on MNIST, in one file.

The Generator G turns random noise z into images; the Discriminator D tells real digits from G's
fakes, and G learns to fool it. The GAN comes first; below the marked line, the script around it.
"""
import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

try:
    import fcntl  # to lock a run folder; Windows has none
except ImportError:
    fcntl = None

IMAGE_SHAPE = (1, 28, 28)  # MNIST's channels, height, width


def mlp(widths, dropout=0.0):
    """Linear layers through `widths`; after each hidden one,
    LeakyReLU and Dropout (if asked)."""
    layers = []
    # Each neighbouring pair (in, out) but the last is a hidden layer
    for width_in, width_out in zip(widths[:-2], widths[1:-1]):
        layers.append(nn.Linear(width_in, width_out))
        # LeakyReLU: a gradient for negative inputs too
        layers.append(nn.LeakyReLU(0.2))
        if dropout:
            layers.append(nn.Dropout(dropout))
    return [*layers, nn.Linear(widths[-2], widths[-1])]


class Generator(nn.Module):
    """Noise z (N, latent_dim) -> images (N, *image_shape) in [-1, 1]."""

    def __init__(self, latent_dim=100, hidden=(256, 512, 1024),
                 image_shape=IMAGE_SHAPE):
        super().__init__()
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)
        widths = [latent_dim, *hidden, math.prod(image_shape)]
        # Tanh: the range of the scaled data
        self.net = nn.Sequential(*mlp(widths), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, *self.image_shape)


class Discriminator(nn.Module):
    """Images -> one logit each: log(p / (1 - p)), p = P(real)."""

    def __init__(self, hidden=(512, 256), dropout=0.3,
                 image_shape=IMAGE_SHAPE):
        super().__init__()
        # Dropout: a noisier D, slower to memorise the data.
        # No Sigmoid: the loss takes logits.
        widths = [math.prod(image_shape), *hidden, 1]
        self.net = nn.Sequential(nn.Flatten(), *mlp(widths, dropout))

    def forward(self, images):
        return self.net(images)


def make_optimizer(net, lr=3e-4, betas=(0.5, 0.999)):
    # beta1 = 0.5, not 0.9: shorter momentum, so each network
    # follows the other's latest moves (Radford et al., 2015).
    # lr 3e-4, not the usual 2e-4: better digits in 50 epochs.
    # fused: one kernel updates all the weights.
    fused = next(net.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(net.parameters(), lr, betas, fused=fused)


# BCE of a logit l, label y: -[y log s(l) + (1-y) log(1 - s(l))]
# for the sigmoid s. From logits it stays finite and accurate where
# s(l) rounds to 0 or 1 and the log would blow up.
bce = nn.BCEWithLogitsLoss()


def train_step(G, D, opt_G, opt_D, real, z, amp=False):
    """One D update, then one G update. Returns [Loss_D, Loss_G,
    D(x), D(G(z))] on the device: reading it waits for the step."""
    # --amp: bfloat16 products. Off: no autocast (MPS may lack it).
    autocast = contextlib.nullcontext()
    if amp:
        autocast = torch.autocast(real.device.type, torch.bfloat16)
    n = len(real)
    with autocast:
        fake = G(z)  # one fake batch serves both updates
        # D maximises log D(x) + log(1 - D(G(z))). detach(): this
        # update must not reach G. One pass over both halves; two
        # if D had BatchNorm, which would mix their statistics.
        logits = D(torch.cat([real, fake.detach()])).float()
        real_logits = logits[:n]
        fake_logits = logits[n:]
        ones = torch.ones_like(real_logits)  # label 1: real
        zeros = torch.zeros_like(fake_logits)  # label 0: fake
        loss_D = bce(real_logits, ones) + bce(fake_logits, zeros)
    opt_D.zero_grad()  # backward() adds to the last step's
    loss_D.backward()
    opt_D.step()

    # G maximises log D(G(z)), the non-saturating loss: the gradient
    # of log(1 - D(G(z))) vanishes while D rejects G's fakes. The
    # updated D judges the same fakes (Algorithm 1 of the paper draws
    # new noise; reusing them saves a G pass). Frozen, D passes G its
    # gradient without computing D's own, which opt_G would not use.
    D.requires_grad_(False)
    try:
        with autocast:
            fooled_logits = D(fake).float()
            loss_G = bce(fooled_logits, torch.ones_like(fooled_logits))
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()
    finally:  # even if interrupted (a notebook's stop button)
        D.requires_grad_(True)

    # D(x), D(G(z)): D's mean P(real), 0.5 at the equilibrium
    d_real = torch.sigmoid(real_logits).mean()
    d_fake = torch.sigmoid(fake_logits).mean()
    return torch.stack([loss_D, loss_G, d_real, d_fake]).detach()


class EMA:
    """A moving average of G's weights (Karras et al., 2018): no
    part of the game, and steadier than G to sample from."""

    def __init__(self, G, decay=0.9995):
        self.G = copy.deepcopy(G).requires_grad_(False)
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, G):
        self.steps += 1
        # Warm-up: the first weights fade fast. (1 + t) / (10 + t)
        # is 0.9 at step 80, 0.999 at 8,990, 0.9995 at 17,990.
        warm_up = (1 + self.steps) / (10 + self.steps)
        decay = min(self.decay, warm_up)
        for averaged, live in zip(self.G.parameters(), G.parameters()):
            # averaged += (1 - decay) (live - averaged)
            averaged.lerp_(live, 1 - decay)
        for averaged, live in zip(self.G.buffers(), G.buffers()):
            averaged.copy_(live)  # BatchNorm's statistics, if any: copied


def to_unit_range(pixels):
    """uint8 pixels in 0..255 -> floats in [-1, 1], Tanh's range."""
    return pixels.float() / 127.5 - 1


def train_epoch(G, D, opt_G, opt_D, pixels, batch_size, order=None,
                amp=False, ema=None):
    """One pass over `pixels` (uint8, on the device) in the order of
    `order` (default: a fresh permutation); yields each step's
    stats. No DataLoader: a batch is an index into `pixels`."""
    device = pixels.device
    if order is None:
        order = torch.randperm(len(pixels), device=device)
    # Full batches: a partial last one is dropped
    for start in range(0, len(order) - batch_size + 1, batch_size):
        real = to_unit_range(pixels[order[start:start + batch_size]])
        z = torch.randn(batch_size, G.latent_dim, device=device)
        stats = train_step(G, D, opt_G, opt_D, real, z, amp)
        if ema is not None:
            ema.update(G)
        yield stats


@torch.no_grad()
def sample(G, z):
    """G in eval mode: no batch statistics (BatchNorm, if any), so
    an image depends on its z alone."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


# ==================================================
# Above: the GAN. Below: the script around it.
# ==================================================

class GanError(Exception):
    """A refusal we foresaw: one line, exit code 1."""


# ---- Data ----
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


def load_dataset(name, data_dir, train=True):
    """A split's uint8 images (N, 1, 28, 28) and labels (N,)."""
    import torchvision  # imported where needed: --help starts faster
    from torchvision.datasets.utils import check_integrity
    dataset = getattr(torchvision.datasets, DATASETS[name])
    raw = Path(data_dir) / dataset.__name__ / "raw"
    made = []  # the folders torchvision will make: gone again if it fails
    folder = raw
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    try:
        data = dataset(data_dir, train, download=True)
    except Exception as e:  # AssertionError, ValueError too
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        lines = str(e).strip().splitlines()
        why = lines[-1] if lines else type(e).__name__
        files = [gz.removesuffix(".gz") for gz, _ in dataset.resources]
        missing = [f for f in files if not any(raw.glob(f + "*"))]  # a .gz counts
        if missing:
            raise GanError(f"{raw} lacks {', '.join(missing)}, and downloading failed "
                           f"({why}): put them there, or fix --data-dir") from e
        damaged = [gz for gz, md5 in dataset.resources
                   if (raw / gz).exists() and not check_integrity(str(raw / gz), md5)]
        if damaged:
            why = ", ".join(damaged)
        raise GanError(f"damaged files in {raw}: {why}") from e
    return data.data.unsqueeze(1), data.targets


def read_folder(folder, channels, size):
    """All images under `folder`, uint8, short side scaled to `size`, centre-cropped."""
    from PIL import Image, ImageOps
    from torchvision.datasets.folder import IMG_EXTENSIONS
    from torchvision.transforms.functional import pil_to_tensor
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if not paths:
        raise GanError(f"no images in {folder} ({' '.join(IMG_EXTENSIONS)})")
    print(f"reading {len(paths):,} images", flush=True)
    start = time.perf_counter()
    images = []
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert({1: "L", 3: "RGB"}[channels])
        except Exception:  # PIL raises many kinds
            bad.append(path)
            continue
        images.append(pil_to_tensor(ImageOps.fit(image, (size, size))))
    if not images:
        raise GanError(f"no image in {folder} can be read, e.g. {bad[0]}")
    print(f"{len(images):,} images from {folder} in {time.perf_counter() - start:.1f}s")
    if bad:
        print(f"{len(bad):,} unreadable, skipped, e.g. {bad[0]}")
    return torch.stack(images)


# ---- Checkpoints ----
STATS = ("Loss_D", "Loss_G", "D(x)", "D(G(z))")  # train_step's
# The flags a resumed run keeps; SAVED adds those it may change
KEPT = {"latent_dim", "g_hidden", "d_hidden", "d_dropout", "ema_decay", "dataset",
        "channels", "image_size", "batch_size", "seed"}
SAVED = KEPT | {"epochs", "lr", "log_every", "data_dir"}
STATEFUL = ("G", "D", "opt_G", "opt_D")  # saved by their state_dict()
PROGRESS = ("epoch", "step", "order", "done", "fixed_noise", "metrics")
RUN_FILES = ("checkpoint.pt", "flags.json", "metrics.csv", "losses.png")


@dataclass
class Run:
    """A training run: checkpoint.pt holds it."""
    G: Generator
    D: Discriminator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    ema: EMA  # grids, --generate and --eval sample its G
    fixed_noise: torch.Tensor  # every grid's z: grids compare
    epoch: int = 0  # epochs completed
    step: int = 0  # one D and one G update each
    order: torch.Tensor | None = None  # this epoch's image order
    done: int = 0  # images of `order` trained on so far
    metrics: list = field(default_factory=list)  # logged rows


def image_shape(args):
    return (args.channels, args.image_size, args.image_size)


def new_run(args, device, checkpoint=None):
    """A run from its flags: new, or as `checkpoint` left it."""
    torch.manual_seed(args.seed)  # weights, grid noise, orders, z, dropout
    G = Generator(args.latent_dim, args.g_hidden, image_shape(args)).to(device)
    D = Discriminator(args.d_hidden, args.d_dropout, image_shape(args)).to(device)
    opt_G = make_optimizer(G, args.lr)
    opt_D = make_optimizer(D, args.lr)
    noise = torch.randn(64, args.latent_dim).to(device)
    run = Run(G, D, opt_G, opt_D, EMA(G, args.ema_decay), noise)
    if checkpoint is None:
        return run
    for name in STATEFUL:
        getattr(run, name).load_state_dict(checkpoint[name])
    run.ema.G.load_state_dict(checkpoint["G_avg"])
    run.ema.steps = checkpoint["step"]
    for opt in (opt_G, opt_D):  # the lr typed now; fused Adam only where the device has it
        fused = opt.defaults["fused"]
        for group in opt.param_groups:
            group.update(lr=args.lr, fused=fused)
        for param, state in opt.state.items():  # fused Adam counts steps on the device
            state["step"] = state["step"].to(param.device if fused else "cpu")
    for name in PROGRESS:
        value = checkpoint[name]
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        setattr(run, name, value)
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    if device.type == "mps" and "mps" in checkpoint["rng"]:
        torch.mps.set_rng_state(checkpoint["rng"]["mps"])
    return run


def run_flags(args):
    return {name: getattr(args, name) for name in sorted(SAVED)}


def save_checkpoint(run, args, run_dir):
    """checkpoint.pt, flags.json and metrics.csv, each whole."""
    rng = {"cpu": torch.get_rng_state()}
    device = run.fixed_noise.device
    if device.type == "cuda":  # its own generator draws z there
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        rng["mps"] = torch.mps.get_rng_state()
    flags = run_flags(args)
    checkpoint = {"args": flags, "rng": rng, "G_avg": run.ema.G.state_dict()}
    for name in STATEFUL:
        checkpoint[name] = getattr(run, name).state_dict()
    for name in PROGRESS:
        checkpoint[name] = getattr(run, name)
    buffer = io.BytesIO()  # to memory: torch.save to a full disk raises a RuntimeError
    torch.save(checkpoint, buffer)
    write_atomically(run_dir / "checkpoint.pt", buffer.getvalue())
    text = json.dumps(flags, indent=2) + "\n"
    write_atomically(run_dir / "flags.json", text.encode())
    save_metrics(run, run_dir)


def save_metrics(run, run_dir):
    table = io.StringIO()
    writer = csv.DictWriter(table, ["epoch", "step", *STATS, "images_per_s"])
    writer.writeheader()
    writer.writerows(run.metrics)
    write_atomically(run_dir / "metrics.csv", table.getvalue().encode())


def write_atomically(path, data):
    """Via a file renamed over `path`: a crash or full disk leaves the old one whole."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename
        os.replace(tmp, path)
        if os.name == "posix":  # the rename on disk too
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except OSError as e:
        reason = e.strerror if e.strerror else type(e).__name__
        raise GanError(f"cannot write {path} ({reason})") from e
    finally:
        with contextlib.suppress(OSError):  # must not mask an error
            tmp.unlink()


def checkpoint_file(run):
    """A run folder's checkpoint.pt, or the file named."""
    path = Path(run)
    if path.is_dir():
        return path / "checkpoint.pt"
    return path


def load_checkpoint(run):
    path = checkpoint_file(run)
    if not path.is_file():
        raise GanError(f"no checkpoint at {path}")
    try:  # weights_only: loading runs no code
        checkpoint = torch.load(path, "cpu", weights_only=True)
    except Exception as e:  # pickle's, zip's or torch's errors
        raise GanError(f"{path} is damaged or not a vanilla_gan checkpoint") from e
    keys = {"args", "rng", "G_avg", *STATEFUL, *PROGRESS}
    if not isinstance(checkpoint, dict) or keys - checkpoint.keys():
        raise GanError(f"{path} is not a vanilla_gan checkpoint")
    return checkpoint


def load_generator(run, device="cpu"):
    """A run's averaged G, in eval mode, for sample(G, z)."""
    return averaged_generator(load_checkpoint(run), device)


def averaged_generator(checkpoint, device):
    parser = build_parser()
    parser.set_defaults(**checkpoint["args"])  # the run's flags; defaults for older runs
    args = parser.parse_args([])
    G = Generator(args.latent_dim, args.g_hidden, image_shape(args))
    G.load_state_dict(checkpoint["G_avg"])
    return G.requires_grad_(False).eval().to(device)


@contextlib.contextmanager
def folder_lock(folder):
    """One trainer in a run folder; the OS unlocks it when the process ends, killed too."""
    if fcntl is None:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GanError(f"{folder} is in use by another trainer") from None
    except OSError:  # a file system without locks (some network ones): train unlocked
        pass
    try:
        yield
    finally:
        os.close(fd)  # and with it the lock


# ---- Outputs ----
def save_grid(images, path):
    """A square grid, as PNG, JPEG, ... by the path's ending."""
    from PIL import Image
    from torchvision.utils import save_image
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format not in Image.SAVE:
        raise GanError(f"{path}: end it in .png, .jpg, ... (or .pt for a tensor)")
    buffer = io.BytesIO()
    side = math.ceil(len(images) ** 0.5)
    save_image(images, buffer, image_format, nrow=side, normalize=True, value_range=(-1, 1))
    write_atomically(path, buffer.getvalue())


# Each curve's value when D can only guess: D(x) = D(G(z)) = 1/2
EQUILIBRIA = {"Loss_D": 2 * math.log(2), "Loss_G": math.log(2), "D(x)": 0.5,
              "D(G(z))": 0.5}


def plot_losses(rows, steps_per_epoch, path):
    from matplotlib.figure import Figure  # no GUI, no global state
    ax = Figure(figsize=(8, 4), layout="constrained").subplots()
    epochs = [row["step"] / steps_per_epoch for row in rows]
    for key, guess in EQUILIBRIA.items():
        line = ax.plot(epochs, [row[key] for row in rows], label=key)[0]
        ax.axhline(guess, color=line.get_color(), ls="--")
    ax.set(xlabel="epoch", title="dashed: each value when D can only guess")
    ax.legend()
    buffer = io.BytesIO()
    ax.figure.savefig(buffer, format="png")
    write_atomically(path, buffer.getvalue())
    return ax.figure


# ---- The quality report ----
def train_classifier(images, labels, device, epochs=3):
    """The judge: a small seeded CNN (99% on MNIST)."""
    with torch.random.fork_rng(devices=[]):  # the CPU's RNG: the GAN's stays
        torch.default_generator.manual_seed(0)  # not torch.manual_seed: it seeds GPUs too
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
            nn.Linear(128, 10)).to(device)
        images = images.to(device)
        labels = labels.to(device)
        optimizer = torch.optim.Adam(model.parameters())
        steps = epochs * math.ceil(len(images) / 128)  # one-cycle: 99% in 3 epochs
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, steps)
        for _ in range(epochs):
            for index in torch.randperm(len(images)).split(128):
                logits = model(to_unit_range(images[index]))
                loss = nn.functional.cross_entropy(logits, labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


@torch.no_grad()
def judge(classifier, images):
    """The 128 features FID uses, and each image's class."""
    device = classifier[0].weight.device
    features = torch.cat([classifier[:-1](x.to(device)) for x in images.split(500)])
    classes = classifier[-1](features).argmax(1).cpu()
    return features.cpu().double(), classes  # MPS has no float64


def frechet_distance(a, b):
    """FID: |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
    cov_a = torch.atleast_2d(torch.cov(a.T))
    cov_b = torch.atleast_2d(torch.cov(b.T))
    # Tr((C_a C_b)^(1/2)): the sum of the roots of C_a C_b's
    # eigenvalues, real but for rounding
    roots = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real
    means = (a.mean(0) - b.mean(0)).square().sum()
    return (means + cov_a.trace() + cov_b.trace() - 2 * roots.sum()).item()


EVAL_SAMPLES = 10_000  # FID falls as N grows: compare at one N


def report_quality(images, dataset, data_dir, device):
    """FID against the test set, and the class shares."""
    train_images, labels = load_dataset(dataset, data_dir)
    test_images = load_dataset(dataset, data_dir, False)[0]
    print("training the judge", flush=True)
    torch.set_float32_matmul_precision("highest")  # no TF32: main() restores the setting
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        classifier = train_classifier(train_images, labels, device)
        features, classes = judge(classifier, images)
        real = judge(classifier, to_unit_range(test_images))[0]
    fid = frechet_distance(features, real)
    shares = torch.bincount(classes, minlength=10) / len(images)
    few = ""
    if len(images) < EVAL_SAMPLES:
        few = " (too few samples to compare)"
    rarest = shares.argmin().item()
    print(f"quality of {len(images)} samples: FID {fid:.2f}{few}, rarest class "
          f"{rarest} at {shares[rarest]:.1%}", flush=True)
    return fid, shares


# ---- The command line ----
DEVICES = "auto, cpu, cuda, cuda:N or mps"
TRAINING = ("epochs", "max_steps", "lr", "out_dir", "log_every", "amp")


def checked(cast, is_valid, expected):
    """An argparse type: `cast`, then refused unless `is_valid`."""
    def number(text):  # a ValueError: "invalid number value"
        value = cast(text)
        if not is_valid(value):
            raise argparse.ArgumentTypeError(f"{text} is not {expected}")
        return value
    return number


positive_int = checked(int, lambda n: n > 0, "positive")
positive = checked(float, lambda x: 0 < x < math.inf, "positive")
fraction = checked(float, lambda x: 0 <= x < 1, "in [0, 1)")
seed = checked(int, lambda n: 0 <= n < 2**64, "a seed in [0, 2**64)")
device_name = checked(str, lambda x: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", x), DEVICES)


def build_parser():
    parser = argparse.ArgumentParser("vanilla_gan.py")
    parser.add_argument("--epochs", type=positive_int, default=50, metavar="N",
                        help="passes over the training set (default: 50)")
    parser.add_argument("--max-steps", type=positive_int, metavar="N",
                        help="stop when the run has N steps (not saved)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help=f"{DEVICES} (default: auto, which is cuda, else mps, else cpu)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--seed", type=seed, default=42,
                        help="seeds weights, noise and order; with --generate, z (default: 42)")
    parser.add_argument("--dataset", default="mnist", choices=[*DATASETS, "fake", "folder"],
                        help="fake: random pixels, the GPU check; folder: your images "
                        "(default: mnist)")
    parser.add_argument("--data-dir", default="data", metavar="DIR",
                        help="holds MNIST/raw/ (or the dataset's); for folder, the images "
                        "(default: data)")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1,
                        help="for folder: 1 grey (the default), 3 RGB")
    parser.add_argument("--image-size", type=positive_int, default=28, metavar="S",
                        help="for folder: images scaled and cropped to S x S (default: 28)")
    parser.add_argument("--latent-dim", type=positive_int, default=100, metavar="N",
                        help="size of the noise z (default: 100)")
    parser.add_argument("--g-hidden", type=positive_int, nargs="+", metavar="W",
                        default=[256, 512, 1024], help="G's hidden widths (default: 256 512 1024)")
    parser.add_argument("--d-hidden", type=positive_int, nargs="+", metavar="W",
                        default=[512, 256], help="D's hidden widths (default: 512 256)")
    parser.add_argument("--d-dropout", type=fraction, default=0.3, metavar="P",
                        help="Dropout in D's hidden layers, 0 for none (default: 0.3)")
    parser.add_argument("--ema-decay", type=fraction, default=0.9995, metavar="X",
                        help="decay of G's average; 0 samples G itself (default: 0.9995)")
    parser.add_argument("--batch-size", type=positive_int, default=128, metavar="N",
                        help="real images per step (default: 128)")
    parser.add_argument("--lr", type=positive, default=3e-4, metavar="X",
                        help="Adam's learning rate, both networks (default: 3e-4)")
    parser.add_argument("--out-dir", metavar="DIR",
                        help="the run folder (default: a new one in runs/)")
    parser.add_argument("--log-every", type=positive_int, default=100, metavar="N",
                        help="print and record every N steps (default: 100)")
    parser.add_argument("--eval", action="store_true",
                        help="report FID and class shares of 10,000 samples (digits only)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="RUN", help="continue a run folder or checkpoint")
    start.add_argument("--generate", type=positive_int, metavar="N",
                       help="only generate N images from --checkpoint")
    parser.add_argument("--checkpoint", metavar="RUN",
                        help="for --generate: a run folder or checkpoint")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="for --generate: a grid (.png, .jpg, ...) or a tensor (.pt) "
                        "(default: generated.png by the checkpoint)")
    return parser


def parse_args(argv=None):
    """Each flag as typed, else the resumed (or sampled) run's, else its default."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generate and not args.checkpoint:
        parser.error("--generate needs --checkpoint")
    if not args.generate and (args.checkpoint or args.out):
        parser.error("--checkpoint and --out go with --generate")
    if args.generate and args.eval and args.generate <= 128:
        parser.error("--eval needs 129+ images (the judge's 128 features)")
    training = [f"--{name.replace('_', '-')}" for name in TRAINING
                if getattr(args, name) != parser.get_default(name)]
    if args.generate and training:
        parser.error(f"--generate takes no {', '.join(training)}")
    saved = {}
    source = args.resume
    if args.generate:
        source = args.checkpoint
    if source:
        path = checkpoint_file(source)
        saved = load_checkpoint(path)["args"]
        parser.set_defaults(**saved, out_dir=str(path.parent))
        args = parser.parse_args(argv)
    kept = KEPT & saved.keys()
    if args.generate:
        kept.discard("seed")  # --generate's seed draws z
    for name in sorted(kept):
        if getattr(args, name) != saved[name]:
            flag = f"--{name.replace('_', '-')}"
            raise GanError(f"the run has {flag} {shown(saved[name])}, not "
                           f"{shown(getattr(args, name))}: it keeps them")
    if args.eval and args.dataset in ("fake", "folder"):
        parser.error(f"--eval needs digits, not {args.dataset}")
    if args.dataset != "folder" and image_shape(args) != IMAGE_SHAPE:
        parser.error("--channels and --image-size are for --dataset folder")
    return args


def shown(value):
    """A value as typed: [512, 256] is 512 256."""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return value


def pick_device(name):
    mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cpu"
        if mps:
            name = "mps"
        if torch.cuda.is_available():
            name = "cuda"
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GanError(f"no {name} here: {gpu_status()}")
    if device.type == "mps" and not mps:
        raise GanError("no mps here: it needs an Apple GPU")
    return device


def gpu_status():
    """What torch sees of CUDA, to say why a GPU is missing."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    count = torch.cuda.device_count()
    if count == 0:
        return f"torch {torch.__version__} sees no CUDA device (no driver?)"
    return f"torch {torch.__version__} sees {count} CUDA device(s)"


# ---- The device check ----
DEVICE_TOLERANCE = 1e-4  # rounding differs by ~1e-6, a layer off by 0.5% by ~1e-2


def device_check(args, device, batches=5):
    """One training step from the run's first weights, on `device` and on the CPU, in float32
    (no TF32, autocast or dropout), for a few batches: the losses, the gradients and the
    updated weights must agree."""
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):  # keeps the CPU's RNG
        run = new_run(args, cpu)
        real = torch.rand(batches, args.batch_size, *image_shape(args)) * 2 - 1
        z = torch.randn(batches, args.batch_size, args.latent_dim)
    torch.set_float32_matmul_precision("highest")  # main() sets it back
    errors = []
    for x, noise in zip(real, z):
        ours = check_step(run, x, noise, device, args.lr)
        cpus = check_step(run, x, noise, cpu, args.lr)
        errors.append([((a - b).norm() / b.norm()).item() for a, b in zip(ours, cpus)])
    # The median drops a batch where rounding flips a LeakyReLU's side; NaN stays NaN
    worst = torch.tensor(errors).median(dim=0).values.max().item()
    if not worst <= DEVICE_TOLERANCE:  # NaN fails too: every comparison with it is false
        raise GanError(f"device check failed: {device} differs from the CPU by "
                       f"{worst:.1e} (tolerance {DEVICE_TOLERANCE:g})")
    print(f"device check passed: {device} matches the CPU to {worst:.0e}")


def check_step(run, real, z, device, lr):
    """One train_step on `device`: its stats, gradients and new weights, on the CPU."""
    G = copy.deepcopy(run.G).to(device)
    D = copy.deepcopy(run.D).to(device).eval()  # no dropout: its masks differ by device
    opt_G = make_optimizer(G, lr)
    opt_D = make_optimizer(D, lr)
    stats = train_step(G, D, opt_G, opt_D, real.to(device), z.to(device))
    grads = [torch.cat([p.grad.flatten() for p in net.parameters()]) for net in (G, D)]
    weights = [torch.cat([p.detach().flatten() for p in net.parameters()]) for net in (G, D)]
    return [t.cpu() for t in (stats, *grads, *weights)]  # compared in float32: MPS has no 64


# ---- Training and generating ----
class StopRequest:
    """Ctrl-C or SIGTERM: the loop finishes the step, saves, exits."""

    def __enter__(self):
        self.signum = None
        self.previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = signum  # no print: it may interrupt one

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            if handler is None:  # set outside Python: the default is the nearest
                handler = signal.SIG_DFL
            signal.signal(signum, handler)


def train(args):
    """Train to --epochs or --max-steps, or a stop: the exit code."""
    device = pick_device(args.device)
    if args.dataset == "fake" and device.type == "cpu":
        raise GanError(f"--dataset fake checks a GPU against the CPU, not the CPU itself: "
                       f"{gpu_status()}")
    if args.dataset == "fake":  # before the run draws numbers
        device_check(args, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores
    # Absolute: --generate --eval reads the data from any folder
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.dataset == "fake":  # random pixels, the same every run
        rng = torch.Generator().manual_seed(0)
        shape = (60_000, *IMAGE_SHAPE)
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=rng)
    elif args.dataset == "folder":
        pixels = read_folder(args.data_dir, args.channels, args.image_size)
    else:
        pixels = load_dataset(args.dataset, args.data_dir)[0]
    pixels = pixels.to(device)
    if args.batch_size > len(pixels):
        raise GanError(f"--batch-size {args.batch_size} exceeds the {len(pixels)} images")
    target = Path("runs")
    if args.out_dir:
        target = Path(args.out_dir)
    inside = target.resolve().is_relative_to(args.data_dir)
    if args.dataset == "folder" and inside:  # its grids would become training images
        raise GanError(f"--out-dir: choose a run folder outside --data-dir {args.data_dir}")
    run_dir = make_run_folder(args.out_dir)
    with folder_lock(run_dir), StopRequest() as stop:
        run = open_run(args, device, run_dir)
        if run.order is not None and len(run.order) != len(pixels):  # the folder changed
            raise GanError(f"the run's epoch has {len(run.order)} images, {args.data_dir} has "
                           f"{len(pixels)}: put them back, or start a new run")
        name = device
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        print(f"device {name}  torch {torch.__version__}  amp {args.amp}\n{args.dataset}: "
              f"{len(pixels)} training images, run folder {run_dir}\n"
              f"flags {json.dumps(run_flags(args))}", flush=True)
        train_run(run, args, pixels, run_dir, stop)
    if stop.signum:
        print(f"{signal.Signals(stop.signum).name}: saved. To resume: "
              f"python vanilla_gan.py --resume {run_dir}")
        return 128 + stop.signum  # 130 (SIGINT) or 143 (SIGTERM)
    if args.eval:  # noise of their own, the same in every report
        rng = torch.Generator().manual_seed(0)
        z = torch.randn(EVAL_SAMPLES, args.latent_dim, generator=rng)
        images = sample(run.ema.G, z.to(device))
        report_quality(images, args.dataset, args.data_dir, device)
    print(f"done: {run.step} steps. Outputs in {run_dir}")
    return 0


def make_run_folder(out_dir):
    """--out-dir, or a new runs/<date-time>-<random>."""
    try:
        if not out_dir:  # None, or an empty --out-dir ""
            out_dir = "runs"  # named if the next line fails
            Path(out_dir).mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S-")
            out_dir = tempfile.mkdtemp(prefix=stamp, dir="runs")
        (Path(out_dir) / "samples").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GanError(f"cannot write in {out_dir} ({e.strerror})") from e
    return Path(out_dir)


def open_run(args, device, run_dir):
    """The run resumed here, read under the lock; or a new one, if the folder has none."""
    own = run_dir / "checkpoint.pt"
    if args.resume and checkpoint_file(args.resume).resolve() == own.resolve():
        return new_run(args, device, load_checkpoint(own))
    if own.exists():
        raise GanError(f"{run_dir} already holds a run; continue it with --resume "
                       f"{run_dir}, or choose another --out-dir")
    checkpoint = None
    if args.resume:  # a run continued in a new folder
        checkpoint = load_checkpoint(args.resume)
    return new_run(args, device, checkpoint)


def train_run(run, args, pixels, run_dir, stop):
    steps_per_epoch = len(pixels) // args.batch_size
    last_step = args.epochs * steps_per_epoch
    if args.max_steps:
        last_step = min(last_step, args.max_steps)
    if run.step >= last_step:
        print(f"nothing to train: the run is at step {run.step} of {last_step}")
    elif (run_dir / "checkpoint.pt").exists():  # resumed here: still writable?
        save_metrics(run, run_dir)
    else:  # a new run claims its folder before any training
        save_checkpoint(run, args, run_dir)
    while run.step < last_step and stop.signum is None:
        start = time.perf_counter()
        means = train_part(run, args, pixels, last_step, stop)
        if not all(p.isfinite().all() for p in run.G.parameters()):  # before a save
            raise GanError(f"training diverged by step {run.step} (G's weights not finite);"
                           " the last checkpoint is kept (try a smaller --lr)")
        completed = len(run.order) - run.done < args.batch_size
        state = "done" if completed else "stopped"
        print(f"epoch {run.epoch + 1}/{args.epochs} {state}: mean {format_stats(means)}  "
              f"{time.perf_counter() - start:.1f}s", flush=True)
        grid = f"step_{run.step:07d}.png"
        if completed:
            run.epoch += 1
            run.order = None
            run.done = 0
            grid = f"epoch_{run.epoch:03d}.png"
        save_checkpoint(run, args, run_dir)
        save_grid(sample(run.ema.G, run.fixed_noise), run_dir / "samples" / grid)
    plot_losses(run.metrics, steps_per_epoch, run_dir / "losses.png")


def train_part(run, args, pixels, last_step, stop):
    """Train to the epoch's end, the last step or a stop: the steps' mean stats."""
    if run.order is None:  # a new order each epoch; a resumed one goes on
        run.order = torch.randperm(len(pixels), device=pixels.device)
    sums = torch.zeros(len(STATS), device=pixels.device)
    first_step = run.step
    start = time.perf_counter()
    for stats in train_epoch(run.G, run.D, run.opt_G, run.opt_D, pixels, args.batch_size,
                             run.order[run.done:], args.amp, run.ema):
        sums += stats  # on the device: no waiting
        run.step += 1
        run.done += args.batch_size
        stopping = run.step >= last_step or stop.signum is not None
        if stopping or run.step % args.log_every == 0:
            stats = stats.tolist()  # waits for the step: only here
            rate = (run.step - first_step) * args.batch_size / (time.perf_counter() - start)
            run.metrics.append({"epoch": run.epoch + 1, "step": run.step,
                                **dict(zip(STATS, stats)), "images_per_s": round(rate)})
            where = f"{run.done // args.batch_size}/{len(run.order) // args.batch_size}"
            print(f"[{run.epoch + 1}/{args.epochs}][{where}] step {run.step}  "
                  f"{format_stats(stats)}  {rate:,.0f} img/s", flush=True)
        if stopping:
            break
    return (sums / (run.step - first_step)).tolist()  # one wait an epoch


def format_stats(stats):
    return "  ".join(f"{name} {value:.4f}" for name, value in zip(STATS, stats))


def generate(args):
    """N images of a run's averaged G, as a grid or a tensor."""
    device = pick_device(args.device)
    source = checkpoint_file(args.checkpoint)
    out = source.parent / "generated.png"
    if args.out:
        out = args.out
    in_samples = out.parent.name == "samples" and (out.parent.parent / "checkpoint.pt").exists()
    if out.name in RUN_FILES or out.resolve() == source.resolve() or in_samples:
        raise GanError(f"--out {out} is for a run's own files: choose another")
    checkpoint = load_checkpoint(source)  # once: a trainer may be saving a newer one
    G = averaged_generator(checkpoint, device)
    # Noise drawn on the CPU: a seed gives the same noise on any device
    rng = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.generate, G.latent_dim, generator=rng)
    images = sample(G, z.to(device)).cpu()
    if out.suffix.lower() == ".pt":
        buffer = io.BytesIO()
        torch.save(images, buffer)
        write_atomically(out, buffer.getvalue())
    else:
        save_grid(images, out)
    print(f"wrote {len(images)} images to {out}: the averaged G at step {checkpoint['step']} "
          f"(epochs done: {checkpoint['epoch']})")
    if checkpoint["step"] == 0:
        print("note: at step 0, before any training, G draws noise")
    if args.eval:
        report_quality(images, args.dataset, args.data_dir, device)
    return 0


def main(argv=None):
    """The command line: main(["--epochs", "1"]) returns the code."""
    if argv is not None:
        argv = [str(arg) for arg in argv]  # Paths and numbers too
    precision = torch.get_float32_matmul_precision()
    try:
        args = parse_args(argv)
        if args.generate:
            return generate(args)
        return train(args)
    except SystemExit as e:  # --help and argparse's errors
        return e.code  # returned: a notebook survives them
    except KeyboardInterrupt:  # Ctrl-C outside the training loop
        print("aborted; files already saved are intact", file=sys.stderr)
        return 130
    except GanError as e:
        print(f"vanilla_gan.py: error: {e}", file=sys.stderr)
        return 1
    finally:  # TF32 off: a notebook's float32 stays exact
        torch.set_float32_matmul_precision(precision)


if __name__ == "__main__":
    sys.exit(main())

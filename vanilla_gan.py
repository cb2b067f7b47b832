"""A vanilla GAN (Goodfellow et al., 2014) on MNIST, in one file.

The Generator G turns random noise z into images; the Discriminator D
tells real digits from G's fakes, and G learns to fool it. The GAN
comes first; below the marked line, the script around it.
"""
import argparse
import contextlib
import copy
import csv
import datetime
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # a command: before torch loads OpenMP
    # Idle threads sleep sooner (GNU OpenMP): faster on a busy CPU
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)  # MNIST's channels, height, width
# LeakyReLU: a gradient for negative inputs too
ACTIVATIONS = {"leaky-relu": lambda: nn.LeakyReLU(0.2), "relu": nn.ReLU}


def mlp(widths, activation="leaky-relu", batchnorm=False, dropout=0.0):
    """Linear layers through `widths`; after each hidden one, BatchNorm
    (if asked), the activation and Dropout (if asked)."""
    layers = [nn.Linear(widths[0], widths[1])]
    for width, next_width in zip(widths[1:], widths[2:]):
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, next_width))
    return layers


class Generator(nn.Module):
    """Noise z (N, latent_dim) -> images (N, *image_shape) in [-1, 1]."""

    def __init__(self, latent_dim=100, hidden=(256, 512, 1024),
                 image_shape=IMAGE_SHAPE, activation="leaky-relu",
                 batchnorm=False):
        super().__init__()
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)
        widths = [latent_dim, *hidden, math.prod(image_shape)]
        # BatchNorm (if asked) normalises over the batch in training,
        # by running statistics in eval mode. Tanh: the data's range.
        layers = mlp(widths, activation, batchnorm)
        self.net = nn.Sequential(*layers, nn.Tanh())

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
        layers = mlp(widths, dropout=dropout)
        self.net = nn.Sequential(nn.Flatten(), *layers)

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
    # amp: bfloat16 products. False: no autocast (MPS may lack it).
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
    # new noise; reusing them saves a G pass). inputs: gradients for
    # G's weights only; D's, which opt_G would not use, are not made.
    with autocast:
        fooled_logits = D(fake).float()
        loss_G = bce(fooled_logits, torch.ones_like(fooled_logits))
    opt_G.zero_grad()
    loss_G.backward(inputs=list(G.parameters()))
    opt_G.step()

    # D(x), D(G(z)): D's mean P(real) before its update; 0.5 at equilibrium
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
        # BatchNorm's statistics, if any: the live G's, not averaged
        for averaged, live in zip(self.G.buffers(), G.buffers()):
            averaged.copy_(live)


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


DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
STATS = ("Loss_D", "Loss_G", "D(x)", "D(G(z))")
# Flags a resume keeps; SAVED adds the others
KEPT = ("batch_size channels d_dropout d_hidden dataset ema_decay g_activation"
        " g_batchnorm g_hidden image_size latent_dim seed").split()
SAVED = [*KEPT, "data_dir", "epochs", "log_every", "lr"]
JUDGE_FEATURES = 128  # FID's: the judge's last hidden layer
EVAL_SAMPLES = 10_000  # FID falls as N grows: compare at one N
TOLERANCE = 1e-4  # rounding: ~1e-6; a layer off by 0.5%: ~1e-2
CHECK_SECONDS = 10  # --check-device times training this long
# Tutorials' setups, here without Dropout or an averaged G
TUTORIAL = dict(latent_dim=100, g_activation="relu", g_batchnorm=False,
                d_dropout=0.0, ema_decay=0.0, batch_size=128, lr=2e-4)
CONFIGS = {
    "shallow": dict(TUTORIAL, g_hidden=[128], d_hidden=[128], batch_size=64, epochs=100),
    "classic": dict(TUTORIAL, g_hidden=[256, 512], g_activation="leaky-relu",
                    d_hidden=[512, 256], epochs=50),
    "deep": dict(TUTORIAL, g_hidden=[256, 512, 1024], d_hidden=[1024, 512, 256], epochs=20),
    "batchnorm": dict(TUTORIAL, latent_dim=64, g_batchnorm=True, epochs=500, lr=1e-5,
                      g_hidden=[128, 256, 512, 1024], d_hidden=[1024, 512, 256]),
}


class GanError(Exception):
    """A refusal we foresaw: one line, exit code 1."""


def load_dataset(name, data_dir, train=True):
    """A split's uint8 images (N, 1, 28, 28) and labels (N,)."""
    import torchvision  # here: --help starts faster
    dataset = getattr(torchvision.datasets, DATASETS[name])
    try:  # online, downloads what is missing
        data = dataset(data_dir, train, download=True)
    except Exception as e:  # torchvision raises many kinds
        raw = Path(data_dir, dataset.__name__, "raw")
        why = f"{type(e).__name__}: {e}".splitlines()[0].rstrip(": ")
        raise GanError(f"cannot load {name} from {raw} ({why}): "
                       "put its four files, or their .gz, there")
    return data.data.unsqueeze(1), data.targets


def read_folder(folder, channels, size):
    """Each image under `folder`, uint8, fit to `size` x `size`."""
    from PIL import Image, ImageOps
    from torchvision.datasets.folder import IMG_EXTENSIONS
    from torchvision.transforms.functional import pil_to_tensor
    if not Path(folder).is_dir():
        raise GanError(f"no folder {folder}")
    images = []
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() not in IMG_EXTENSIONS:
            continue
        try:
            with Image.open(path) as image:
                image = image.convert({1: "L", 3: "RGB"}[channels])
        except Exception:  # PIL raises many kinds: skipped
            continue
        images.append(pil_to_tensor(ImageOps.fit(image, (size, size))))
    if not images:
        raise GanError(f"no readable images in {folder}")
    return torch.stack(images)


def image_shape(flags):
    return (flags["channels"], flags["image_size"], flags["image_size"])


def make_generator(flags):
    return Generator(flags["latent_dim"], flags["g_hidden"], image_shape(flags),
                     flags["g_activation"], flags["g_batchnorm"])


class Run:
    """A run's networks, optimisers, averaged G and progress."""

    def __init__(self, flags, device):
        torch.manual_seed(flags["seed"])  # weights, noise, order, dropout
        self.flags = flags
        self.device = device
        self.G = make_generator(flags).to(device)
        D = Discriminator(flags["d_hidden"], flags["d_dropout"], image_shape(flags))
        self.D = D.to(device)
        self.opt_G = make_optimizer(self.G, flags["lr"])
        self.opt_D = make_optimizer(self.D, flags["lr"])
        self.fixed_noise = torch.randn(64, self.G.latent_dim).to(device)
        self.ema = EMA(self.G, flags["ema_decay"])
        self.epoch = 0  # completed
        self.step = 0
        self.order = None  # the epoch's
        self.done = 0  # images of `order` trained on
        self.metrics = []  # every --log-every steps
        self.stateful = {"G": self.G, "D": self.D, "G_avg": self.ema.G,
                         "opt_G": self.opt_G, "opt_D": self.opt_D}

    def checkpoint(self):
        """All it takes to resume, as one plain dict."""
        rng = {"cpu": torch.get_rng_state()}
        device = self.device
        if device.type != "cpu":  # its own generator draws z there
            rng[device.type] = torch.get_device_module(device).get_rng_state(device)
        states = {k: v.state_dict() for k, v in self.stateful.items()}
        return {"args": self.flags, "rng": rng, **states,
                "fixed_noise": self.fixed_noise, "epoch": self.epoch,
                "step": self.step, "order": self.order,
                "done": self.done, "metrics": self.metrics}

    def resume(self, checkpoint):
        for name, stateful in self.stateful.items():
            stateful.load_state_dict(checkpoint[name])
        for group in [*self.opt_G.param_groups, *self.opt_D.param_groups]:
            group["lr"] = self.flags["lr"]  # lr may change on resume
        self.ema.steps = checkpoint["step"]
        self.fixed_noise = checkpoint["fixed_noise"].to(self.device)
        self.epoch = checkpoint["epoch"]
        self.step = checkpoint["step"]
        self.order = checkpoint["order"]
        if self.order is not None:
            self.order = self.order.to(self.device)
        self.done = checkpoint["done"]
        self.metrics = checkpoint["metrics"]
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["cpu"])
        device = self.device
        if device.type in rng and device.type != "cpu":
            torch.get_device_module(device).set_rng_state(rng[device.type], device)


@contextlib.contextmanager
def written_whole(path):
    """A path to write, renamed to `path`: a kill midway leaves the old."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def stamp(path):  # changes with each write
    if not path.exists():
        return None
    status = path.stat()
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def save_checkpoint(checkpoint, run_dir, last_stamp):
    """Unless checkpoint.pt changed since `last_stamp`."""
    path = run_dir / "checkpoint.pt"
    if stamp(path) != last_stamp:  # another run's, maybe training
        raise GanError(f"{run_dir} holds another run: "
                       f"--resume {run_dir} when idle, or another --out-dir")
    with written_whole(path) as tmp, open(tmp, "wb") as f:
        torch.save(checkpoint, f)  # a full disk: OSError, one line
    with written_whole(run_dir / "flags.json") as tmp:
        tmp.write_text(json.dumps(checkpoint["args"], indent=2) + "\n")
    return stamp(path)


def checkpoint_file(run):
    path = Path(run)
    return path / "checkpoint.pt" if path.is_dir() else path


def load_checkpoint(path):
    try:  # weights_only: loading runs no code
        checkpoint = torch.load(path, "cpu", weights_only=True)
    except Exception:  # the OS's or the file's errors
        raise GanError(f"{path} is missing, damaged or not a checkpoint")
    if not isinstance(checkpoint, dict) or "G_avg" not in checkpoint:
        raise GanError(f"{path} is not a vanilla_gan checkpoint")
    return checkpoint


def load_generator(run, device="cpu", checkpoint=None):
    """A run folder's (or checkpoint's) averaged G, for sample()."""
    if checkpoint is None:
        checkpoint = load_checkpoint(checkpoint_file(run))
    G = make_generator(checkpoint["args"])
    G.load_state_dict(checkpoint["G_avg"])
    return G.requires_grad_(False).eval().to(device)


def save_grid(images, path):
    from PIL import Image
    from torchvision.utils import save_image
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format not in Image.SAVE:
        raise GanError(f"{path}: end it in .png, .jpg, ... or .pt")
    side = math.ceil(len(images) ** 0.5)
    with written_whole(path) as tmp:
        save_image(images, tmp, image_format, nrow=side,
                   normalize=True, value_range=(-1, 1))


def save_progress(samples):
    """progress.gif: the epochs' grids so far, at most 100."""
    from PIL import Image
    paths = sorted(samples.glob("epoch_*.png"))
    if not paths:
        return
    every = math.ceil(len(paths) / 100)  # redrawn fast
    frames = [Image.open(p) for p in paths[::-every][::-1]]  # the last too
    with written_whole(samples / "progress.gif") as tmp:
        frames[0].save(tmp, "GIF", save_all=True, append_images=frames[1:],
                       duration=200, loop=0)


def save_metrics(rows, path):
    with written_whole(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", *STATS])
        writer.writeheader()
        writer.writerows(rows)


def plot_losses(rows, steps_per_epoch, path):
    from matplotlib.figure import Figure  # no GUI, no global state
    ax = Figure(figsize=(8, 4), layout="constrained").subplots()
    epochs = [row["step"] / steps_per_epoch for row in rows]
    guesses = (2 * math.log(2), math.log(2), 0.5, 0.5)  # D guessing
    for name, guess in zip(STATS, guesses):  # dots: one row shows too
        line = ax.plot(epochs, [row[name] for row in rows], ".-", label=name)[0]
        ax.axhline(guess, color=line.get_color(), ls="--", lw=1)
    ax.set(xlabel="epoch", title="dashed: each curve where D only guesses")
    ax.legend()
    with written_whole(path) as tmp:
        ax.figure.savefig(tmp, format="png")


def train_classifier(images, labels, device, epochs=3):
    """The judge: a small seeded CNN (99% on MNIST)."""
    with torch.random.fork_rng(devices=[]):  # the GAN's RNG stays
        torch.default_generator.manual_seed(0)  # the CPU's only
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, JUDGE_FEATURES), nn.ReLU(),
            nn.Linear(JUDGE_FEATURES, 10)).to(device)
        images = images.to(device)
        labels = labels.to(device)
        optimizer = torch.optim.Adam(model.parameters())
        steps = epochs * math.ceil(len(images) / 128)
        # lr up to 3e-3 and back: 99% in 3 epochs
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, steps)
        for epoch in range(epochs):
            print(f"training the judge: epoch {epoch + 1}/{epochs}", flush=True)
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
    device = classifier[0].weight.device
    features = torch.cat([classifier[:-1](x.to(device)) for x in images.split(500)])
    classes = classifier[-1](features).argmax(1).cpu()
    return features.cpu().double(), classes  # MPS has no float64


def frechet_distance(a, b):
    """FID: |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
    cov_a = torch.cov(a.T)
    cov_b = torch.cov(b.T)
    # Tr((C_a C_b)^(1/2)): the roots of C_a C_b's eigenvalues, summed
    roots = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real
    means = (a.mean(0) - b.mean(0)).square().sum()
    return (means + cov_a.trace() + cov_b.trace() - 2 * roots.sum()).item()


def report_quality(images, dataset, data_dir, device):
    """FID against the test set, and the class shares."""
    n = len(images)
    if n <= JUDGE_FEATURES:  # else a rank-deficient covariance
        raise GanError(f"--eval needs over {JUDGE_FEATURES} samples, not {n}")
    train_images, labels = load_dataset(dataset, data_dir)
    test_images = load_dataset(dataset, data_dir, False)[0]
    classifier = train_classifier(train_images, labels, device)
    features, classes = judge(classifier, images)
    real = judge(classifier, to_unit_range(test_images))[0]
    fid = frechet_distance(features, real)
    shares = torch.bincount(classes, minlength=10) / n
    rarest = shares.argmin().item()
    print(f"quality of {n} samples: FID {fid:.2f}, rarest class "
          f"{rarest} at {shares[rarest]:.1%}", flush=True)
    return fid, shares


def pick_device(name):
    """auto: cuda, else mps, else cpu."""
    here = {"cpu": True, "mps": torch.backends.mps.is_available(),
            "cuda": torch.cuda.is_available()}
    if name == "auto":
        name = "cuda" if here["cuda"] else "mps" if here["mps"] else "cpu"
    if not here[name]:
        raise GanError(f"no {name} here: torch {torch.__version__} "
                       f"(CUDA {torch.version.cuda}) sees none")
    return torch.device(name)


def check_step(flags, real, z, device):
    """A first train_step's stats, gradients and weights."""
    run = Run(flags, device)
    run.D.eval()  # no dropout masks
    stats = train_step(run.G, run.D, run.opt_G, run.opt_D,
                       real.to(device), z.to(device))
    params = [*run.G.parameters(), *run.D.parameters()]
    grads = torch.cat([p.grad.flatten() for p in params])
    weights = torch.cat([p.detach().flatten() for p in params])
    return [t.cpu() for t in (stats, grads, weights)]


def compare_with_cpu(flags, device, batches=5):
    """A float32 step's worst relative difference from the CPU's."""
    shape = (batches, flags["batch_size"])
    real = torch.rand(*shape, *image_shape(flags)) * 2 - 1
    z = torch.randn(*shape, flags["latent_dim"])
    errors = []
    for x, noise in zip(real, z):
        ours = check_step(flags, x, noise, device)
        cpus = check_step(flags, x, noise, torch.device("cpu"))
        errors.append([((a - b).norm() / b.norm()).item() for a, b in zip(ours, cpus)])
    # The median drops a batch a flipped LeakyReLU spoils; NaN stays
    return torch.tensor(errors).median(dim=0).values.max().item()


def seconds_per_step(flags, device, chunk=10):
    """Seconds a step, timed for CHECK_SECONDS after a warm-up."""
    run = Run(flags, device)
    batch = flags["batch_size"]
    shape = (chunk * batch, *image_shape(flags))
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8).to(device)
    times = []  # the first chunk's is the warm-up's
    while sum(times[1:]) < CHECK_SECONDS:
        start = time.perf_counter()
        steps = train_epoch(run.G, run.D, run.opt_G, run.opt_D, pixels, batch,
                            amp=flags["amp"], ema=run.ema)
        list(steps)[-1].tolist()  # waits for the last step
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / (chunk * (len(times) - 1))


def check_device(flags, device):
    """A step on `device` against the CPU's, then training's speed."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else device
    print(f"device {name}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    if device != torch.device("cpu"):  # the CPU: the reference
        error = compare_with_cpu(flags, device)
        if not error <= TOLERANCE:  # NaN fails too
            raise GanError(f"device check failed: {device} is off by {error:.1e}")
        print(f"device check passed: {device} matches the CPU to {error:.0e}")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # training's alone
    seconds = seconds_per_step(flags, device)
    epochs = flags["epochs"]
    steps = epochs * (60_000 // flags["batch_size"])
    print(f"training: {flags['batch_size'] / seconds:,.0f} img/s; {epochs} epochs "
          f"of MNIST ({steps:,} steps) in {steps * seconds / 60:.1f} min")
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory {peak:.2f} GiB")


def format_stats(stats):
    return "  ".join(f"{name} {x:.4f}" for name, x in zip(STATS, stats))


def time_left(steps, steps_per_second):
    return f"{datetime.timedelta(seconds=round(steps / steps_per_second))} left"


def run_folder(args):
    """--out-dir, or a new runs/<date-time>-<random> as runs/latest."""
    name = time.strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()
    folder = Path(args.out_dir) if args.out_dir else Path("runs", name)
    inside = folder.resolve().is_relative_to(args.data_dir)
    if args.dataset == "folder" and inside:  # its grids: read as data
        raise GanError(f"{folder} is inside --data-dir: give another --out-dir")
    folder.mkdir(parents=True, exist_ok=True)
    if not args.out_dir:  # Windows may refuse links
        with contextlib.suppress(OSError), written_whole(Path("runs/latest")) as tmp:
            tmp.symlink_to(name, target_is_directory=True)
    return folder


def train(args, device):
    """Train to --epochs or --max-steps: the exit code."""
    args.data_dir = str(Path(args.data_dir).resolve())  # for resume
    if args.dataset == "folder":
        pixels = read_folder(args.data_dir, args.channels, args.image_size)
    else:
        pixels = load_dataset(args.dataset, args.data_dir)[0]
    pixels = pixels.to(device)
    n = len(pixels)
    batch = args.batch_size
    if batch > n:
        raise GanError(f"--batch-size {batch}: only {n} images")
    flags = {name: getattr(args, name) for name in sorted(SAVED)}
    run = Run(flags, device)
    if args.resume:
        run.resume(args.saved)
    if run.order is not None and len(run.order) != n:
        raise GanError(f"the run's epoch has {len(run.order)} images, "
                       f"{args.data_dir} now {n}: put them back")
    run_dir = run_folder(args)
    last_stamp = args.saved_stamp  # the resumed file's
    if last_stamp is None or stamp(run_dir / "checkpoint.pt") != last_stamp:
        # Saved first: a taken folder costs no epoch
        last_stamp = save_checkpoint(run.checkpoint(), run_dir, None)
    print(f"device {device}  torch {torch.__version__}  amp {args.amp}\n"
          f"{n} images, run folder {run_dir}\nflags {json.dumps(flags)}")
    per_epoch = n // batch  # steps
    end = run.step - run.done // batch + (args.epochs - run.epoch) * per_epoch
    end = min(end, args.max_steps)  # the run's last step
    saved_step = run.step
    try:
        while run.step < end:
            if run.order is None:  # a new epoch: a new order
                run.order = torch.randperm(n, device=device)
            start = time.perf_counter()
            first = run.step
            sums = torch.zeros(len(STATS), device=device)
            steps = train_epoch(run.G, run.D, run.opt_G, run.opt_D, pixels,
                                batch, run.order[run.done:], args.amp, run.ema)
            for stats in itertools.islice(steps, end - run.step):
                sums += stats  # on the device: no waiting
                run.step += 1
                run.done += batch
                if run.step % args.log_every == 0:
                    stats = stats.tolist()  # waits for the step: only here
                    pace = (run.step - first) / (time.perf_counter() - start)
                    run.metrics.append({"epoch": run.epoch + 1, "step": run.step,
                                        **dict(zip(STATS, stats))})
                    print(f"[{run.epoch + 1}/{args.epochs}][{run.done // batch}/{per_epoch}]"
                          f" step {run.step}  {format_stats(stats)}  {pace * batch:,.0f} img/s"
                          f"  {time_left(end - run.step, pace)}", flush=True)
            means = (sums / (run.step - first)).tolist()  # one wait
            if not all(p.isfinite().all() for p in run.G.parameters()):
                raise GanError(f"diverged by step {run.step}; try a smaller --lr")
            seconds = time.perf_counter() - start
            left = time_left(end - run.step, (run.step - first) / seconds)
            print(f"epoch {run.epoch + 1}/{args.epochs}: mean of {run.step - first} steps "
                  f"{format_stats(means)}  {seconds:.1f}s, {left}", flush=True)
            grid = f"step_{run.step:07d}.png"
            if len(run.order) - run.done < batch:  # the epoch is done
                run.epoch += 1
                run.order = None
                run.done = 0
                grid = f"epoch_{run.epoch:03d}.png"
            last_stamp = save_checkpoint(run.checkpoint(), run_dir, last_stamp)
            saved_step = run.step
            save_grid(sample(run.ema.G, run.fixed_noise), run_dir / "samples" / grid)
            save_progress(run_dir / "samples")
            save_metrics(run.metrics, run_dir / "metrics.csv")
            plot_losses(run.metrics, per_epoch, run_dir / "losses.png")
    except KeyboardInterrupt:  # Ctrl-C: the last checkpoint is whole
        print(f"interrupted; resume from step {saved_step}: "
              f"python vanilla_gan.py --resume {run_dir}")
        return 130
    if args.eval:  # noise of its own, the same each report
        rng = torch.Generator().manual_seed(0)
        z = torch.randn(EVAL_SAMPLES, args.latent_dim, generator=rng)
        images = sample(run.ema.G, z.to(device))
        report_quality(images, args.dataset, args.data_dir, device)
    print(f"done: {run.step} steps. Outputs in {run_dir}")
    return 0


def generate(args, device):
    """N images of a run's averaged G, as a grid or a tensor."""
    out = args.out
    if out.resolve() == checkpoint_file(args.checkpoint).resolve():
        raise GanError(f"--out {out} is the checkpoint it reads")
    G = load_generator(args.checkpoint, device, args.saved)
    rng = torch.Generator().manual_seed(args.seed)  # CPU: the same z anywhere
    z = torch.randn(args.generate, G.latent_dim, generator=rng)
    images = sample(G, z.to(device)).cpu()
    if out.suffix.lower() == ".pt":
        with written_whole(out) as tmp, open(tmp, "wb") as f:
            torch.save(images, f)
    else:
        save_grid(images, out)
    print(f"wrote {len(images)} images to {out} from step "
          f"{args.saved['step']} (epochs done: {args.saved['epoch']})")
    if args.eval:
        report_quality(images, args.dataset, args.data_dir, device)
    return 0


def in_range(cast, low, high):
    """An argparse type: `cast`, then refused outside [low, high)."""
    def parse(text):
        value = cast(text)
        if not low <= value < high:  # NaN too
            raise argparse.ArgumentTypeError(f"{text} is not in [{low}, {high})")
        return value
    return parse


def build_parser():
    count = in_range(int, 1, math.inf)
    fraction = in_range(float, 0, 1)  # lr too: 2e4 is refused
    parser = argparse.ArgumentParser(
        "vanilla_gan.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--config", choices=CONFIGS, help="a tutorial's setup; flags win")
    add("--epochs", type=count, default=50, help="passes over the data")
    add("--max-steps", type=count, default=math.inf, help="step to stop at")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
        help="auto: cuda, else mps, else cpu")
    add("--amp", action="store_true", help="bfloat16 autocast")
    add("--seed", type=int, default=42, help="weights, noise, order, dropout")
    add("--dataset", choices=[*DATASETS, "folder"], default="mnist",
        help="folder: yours")
    add("--data-dir", default="data", help="holds MNIST/raw/ etc., or folder's")
    add("--channels", type=int, choices=[1, 3], default=1, help="folder: grey, RGB")
    add("--image-size", type=count, default=28, help="folder: side to fit to")
    add("--latent-dim", type=count, default=100, help="z's size")
    add("--g-hidden", type=count, nargs="+", default=[256, 512, 1024],
        help="G's widths")
    add("--g-activation", choices=ACTIVATIONS, default="leaky-relu", help="G's")
    add("--g-batchnorm", action="store_true", help="before G's activations")
    add("--d-hidden", type=count, nargs="+", default=[512, 256], help="D's widths")
    add("--d-dropout", type=fraction, default=0.3, help="0 for none")
    add("--ema-decay", type=fraction, default=0.9995, help="G's average; 0: G itself")
    add("--batch-size", type=count, default=128, help="real images per step")
    add("--lr", type=fraction, default=3e-4, help="Adam's, G's and D's")
    add("--out-dir", help="None: a new one in runs/")
    add("--log-every", type=count, default=100, help="steps between logs")
    add("--eval", action="store_true", help="FID and class shares")
    only = parser.add_mutually_exclusive_group().add_argument
    only("--resume", metavar="RUN", help="a run folder or checkpoint")
    only("--generate", type=count, metavar="N", help="only make N images")
    only("--check-device", action="store_true", help="only check --device")
    add("--checkpoint", metavar="RUN", help="--generate's run")
    add("--out", type=Path, default="generated.png", help="--generate's .png, .pt")
    # set by parse_args from the run it reads
    parser.set_defaults(saved=None, saved_stamp=None)
    return parser


def parse_args(argv=None):
    """Each flag as typed, else --config's, the run's, its default."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.generate) != bool(args.checkpoint):
        parser.error("--generate N and --checkpoint RUN go together")
    source = args.checkpoint if args.generate else args.resume
    saved = {}
    if source:
        path = checkpoint_file(source).resolve()  # runs/latest: its folder
        last_stamp = stamp(path)  # before reading: see save_checkpoint
        checkpoint = load_checkpoint(path)  # once: a trainer may save anew
        saved = checkpoint["args"]
        parser.set_defaults(**saved, out_dir=str(path.parent), saved=checkpoint,
                            saved_stamp=last_stamp)
    if args.config:  # over the run's; a change is refused
        parser.set_defaults(**CONFIGS[args.config])
    args = parser.parse_args(argv)  # again, with those defaults
    for name in sorted(set(KEPT) & saved.keys()):
        value = getattr(args, name)
        if value != saved[name] and not (args.generate and name == "seed"):
            flag = f"--{name.replace('_', '-')}"
            raise GanError(f"the run has {flag} {saved[name]}, not {value}")
    if args.eval and args.generate and args.generate <= JUDGE_FEATURES:
        raise GanError(f"--eval needs over {JUDGE_FEATURES} samples, not {args.generate}")
    if args.eval and args.dataset == "folder":
        parser.error("--eval needs a built-in dataset, not folder")
    if args.dataset != "folder" and image_shape(vars(args)) != IMAGE_SHAPE:
        parser.error("--channels and --image-size are for folder")
    return args


def main(argv=None):
    """The command line: main(["--epochs", "1"]) returns the code."""
    try:
        args = parse_args(argv)
        device = pick_device(args.device)
        if args.check_device:
            check_device(vars(args), device)
            return 0
        if args.generate:
            return generate(args, device)
        return train(args, device)
    except SystemExit as e:  # --help and argparse's errors
        return e.code  # returned: a notebook survives them
    except KeyboardInterrupt:  # Ctrl-C outside training
        print("interrupted", file=sys.stderr)
        return 130
    except (GanError, OSError) as e:  # OSError: in Python's words
        print(f"vanilla_gan.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

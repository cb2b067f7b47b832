"""A vanilla GAN (Goodfellow et al., 2014) on MNIST, in one file.

The Generator G turns random noise z into images; the Discriminator D
tells real digits from G's fakes, and G learns to fool it. The GAN
comes first; below the marked line, the script around it.
"""
import argparse
import contextlib
import copy
import csv
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    # amp: bfloat16 products. Off: no autocast (MPS may lack it).
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
        for averaged, live in zip(self.G.buffers(), G.buffers()):
            averaged.copy_(live)  # BatchNorm's statistics: copied


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


DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


def load_dataset(name, data_dir, train=True):
    """A split's uint8 images (N, 1, 28, 28) and labels (N,)."""
    import torchvision  # here: --help starts faster
    dataset = getattr(torchvision.datasets, DATASETS[name])
    raw = Path(data_dir, dataset.__name__, "raw")
    made = [p for p in [raw, *raw.parents] if not p.exists()]
    try:
        data = dataset(data_dir, train, download=True)
    except Exception as e:  # torchvision raises many kinds
        for folder in made:  # it made them: gone again
            with contextlib.suppress(OSError):
                folder.rmdir()
        why = " ".join(f"{type(e).__name__}: {e}".split())
        raise GanError(f"cannot load {name} from {raw}: {why}")
    return data.data.unsqueeze(1), data.targets


def read_folder(folder, channels, size):
    """Each image under `folder`, uint8, fit to `size` x `size`."""
    from PIL import Image, ImageOps
    from torchvision.datasets.folder import IMG_EXTENSIONS
    from torchvision.transforms.functional import pil_to_tensor
    images = []
    bad = []
    paths = [p for p in sorted(Path(folder).rglob("*")) if p.suffix.lower() in IMG_EXTENSIONS]
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert({1: "L", 3: "RGB"}[channels])
        except Exception:  # PIL raises many kinds
            bad.append(path)
            continue
        images.append(pil_to_tensor(ImageOps.fit(image, (size, size))))
    if bad:
        print(f"{len(bad)} unreadable, skipped, e.g. {bad[0]}")
    if not images:
        raise GanError(f"no readable images in {folder}")
    return torch.stack(images)


STATS = ("Loss_D", "Loss_G", "D(x)", "D(G(z))")  # train_step's
# Flags a resume keeps; SAVED adds those it may change
KEPT = {"latent_dim", "g_hidden", "g_activation", "g_batchnorm", "d_hidden", "d_dropout",
        "ema_decay", "dataset", "channels", "image_size", "batch_size", "seed"}
SAVED = KEPT | {"epochs", "lr", "log_every", "data_dir"}
STATEFUL = ("G", "D", "opt_G", "opt_D")
PROGRESS = ("epoch", "step", "order", "done", "fixed_noise", "metrics")
RUN_FILES = ("checkpoint.pt", "flags.json", "metrics.csv", "losses.png")


@dataclass
class Run:
    """A training run: checkpoint.pt holds it."""
    G: Generator
    D: Discriminator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    ema: EMA  # its G draws the grids and --generate's images
    fixed_noise: torch.Tensor  # every grid's z
    epoch: int = 0  # completed
    step: int = 0
    order: torch.Tensor | None = None  # this epoch's
    done: int = 0  # images of `order` trained on
    metrics: list = field(default_factory=list)


def image_shape(flags):
    return (flags["channels"], flags["image_size"], flags["image_size"])


def make_generator(flags):  # .get: runs from before those flags
    return Generator(flags["latent_dim"], flags["g_hidden"], image_shape(flags),
                     flags.get("g_activation", "leaky-relu"), flags.get("g_batchnorm", False))


def new_run(flags, device, checkpoint=None):
    """A new run from `flags`, or as `checkpoint` left it."""
    torch.manual_seed(flags["seed"])  # weights, noise, order, dropout
    G = make_generator(flags).to(device)
    D = Discriminator(flags["d_hidden"], flags["d_dropout"], image_shape(flags)).to(device)
    opt_G = make_optimizer(G, flags["lr"])
    opt_D = make_optimizer(D, flags["lr"])
    noise = torch.randn(64, G.latent_dim).to(device)
    run = Run(G, D, opt_G, opt_D, EMA(G, flags["ema_decay"]), noise)
    if checkpoint is None:
        return run
    for name in STATEFUL:
        getattr(run, name).load_state_dict(checkpoint[name])
    run.ema.G.load_state_dict(checkpoint["G_avg"])
    run.ema.steps = checkpoint["step"]
    for group in [*opt_G.param_groups, *opt_D.param_groups]:
        group["lr"] = flags["lr"]  # lr may change on resume
    for name in PROGRESS:
        value = checkpoint[name]
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        setattr(run, name, value)
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["cpu"])
    if device.type != "cpu" and device.type in rng:
        torch.get_device_module(device).set_rng_state(rng[device.type], device)
    return run


@contextlib.contextmanager
def written_whole(path, exclusive=False):
    """Yields a temporary path to write; renamed to `path` after."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if exclusive:
            os.link(tmp, path)  # only a new one: FileExistsError
        else:
            os.replace(tmp, path)  # a crash leaves the old one whole
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(run, flags, run_dir, exclusive=False):
    """checkpoint.pt, all it takes to resume, and flags.json."""
    rng = {"cpu": torch.get_rng_state()}
    device = run.fixed_noise.device
    if device.type != "cpu":  # its own generator draws z there
        rng[device.type] = torch.get_device_module(device).get_rng_state(device)
    checkpoint = {"args": flags, "rng": rng, "G_avg": run.ema.G.state_dict()}
    for name in STATEFUL:
        checkpoint[name] = getattr(run, name).state_dict()
    for name in PROGRESS:
        checkpoint[name] = getattr(run, name)
    with written_whole(run_dir / "checkpoint.pt", exclusive) as tmp, open(tmp, "wb") as f:
        torch.save(checkpoint, f)  # a full disk: OSError, as open()'s
    with written_whole(run_dir / "flags.json") as tmp:
        tmp.write_text(json.dumps(flags, indent=2) + "\n")


def checkpoint_file(run):
    """A run folder's checkpoint.pt, or the file named."""
    path = Path(run)
    return path / "checkpoint.pt" if path.is_dir() else path


def load_checkpoint(run):
    path = checkpoint_file(run)
    if not path.is_file():
        raise GanError(f"no checkpoint at {path}")
    try:  # weights_only: loading runs no code
        checkpoint = torch.load(path, "cpu", weights_only=True)
    except Exception:  # pickle's, zip's or torch's errors
        raise GanError(f"{path} is damaged or not a checkpoint")
    keys = {"args", "rng", "G_avg", *STATEFUL, *PROGRESS}
    if not isinstance(checkpoint, dict) or keys - checkpoint.keys():
        raise GanError(f"{path} is not a vanilla_gan checkpoint")
    return checkpoint


def load_generator(run, device="cpu", checkpoint=None):
    """A run's averaged G, in eval mode, for sample(G, z)."""
    if checkpoint is None:
        checkpoint = load_checkpoint(run)
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
        save_image(images, tmp, image_format, nrow=side, normalize=True, value_range=(-1, 1))


def save_metrics(rows, path):
    with written_whole(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", *STATS, "images_per_s"])
        writer.writeheader()
        writer.writerows(rows)


def plot_losses(rows, steps_per_epoch, path):
    from matplotlib.figure import Figure  # no GUI, no global state
    ax = Figure(figsize=(8, 4), layout="constrained").subplots()
    epochs = [row["step"] / steps_per_epoch for row in rows]
    for name in STATS:  # dots: a single row shows too
        ax.plot(epochs, [row[name] for row in rows], ".-", label=name)
    for guess in (2 * math.log(2), math.log(2), 0.5):
        ax.axhline(guess, color="grey", ls="--", lw=1)
    ax.set(xlabel="epoch", title="dashed: where D can only guess")
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
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
        images = images.to(device)
        labels = labels.to(device)
        optimizer = torch.optim.Adam(model.parameters())
        steps = epochs * math.ceil(len(images) / 128)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, steps)  # 99% in 3 epochs
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
    # Tr((C_a C_b)^(1/2)): the summed roots of C_a C_b's eigenvalues, real but for rounding
    roots = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real
    means = (a.mean(0) - b.mean(0)).square().sum()
    return (means + cov_a.trace() + cov_b.trace() - 2 * roots.sum()).item()


EVAL_SAMPLES = 10_000  # FID falls as N grows: compare at one N


def report_quality(images, dataset, data_dir, device):
    """FID against the test set, and the class shares."""
    train_images, labels = load_dataset(dataset, data_dir)
    test_images = load_dataset(dataset, data_dir, False)[0]
    print("training the judge", flush=True)
    torch.set_float32_matmul_precision("highest")  # no TF32; main() restores
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        classifier = train_classifier(train_images, labels, device)
        features, classes = judge(classifier, images)
        real = judge(classifier, to_unit_range(test_images))[0]
    fid = frechet_distance(features, real)
    shares = torch.bincount(classes, minlength=10) / len(images)
    rarest = shares.argmin().item()
    print(f"quality of {len(images)} samples: FID {fid:.2f}, rarest class "
          f"{rarest} at {shares[rarest]:.1%}", flush=True)
    return fid, shares


def pick_device(name):
    if name == "auto":
        name = "cpu"
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
    device = torch.device(name)
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if device.type == "cuda" and index >= count:
        why = "is built without CUDA"
        if torch.version.cuda:
            why = f"sees {count} CUDA device(s) (no driver?)"
        raise GanError(f"no {name} here: torch {torch.__version__} {why}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GanError(f"no mps here: torch {torch.__version__} sees no Apple GPU")
    if device.type == "cuda":  # TF32 tensor cores; main() restores
        torch.set_float32_matmul_precision("high")
    return device


TOLERANCE = 1e-4  # rounding differs by ~1e-6, a layer off by 0.5% by ~1e-2
CHECK_SECONDS = 10  # --check-device times training this long


def compare_with_cpu(flags, device, batches=5):
    """A float32 step's worst relative difference on `device` from the CPU's."""
    run = new_run(flags, torch.device("cpu"))
    real = torch.rand(batches, flags["batch_size"], *image_shape(flags)) * 2 - 1
    z = torch.randn(batches, flags["batch_size"], run.G.latent_dim)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32
    errors = []
    for x, noise in zip(real, z):
        ours = check_step(run, x, noise, device, flags["lr"])
        cpus = check_step(run, x, noise, "cpu", flags["lr"])
        errors.append([((a - b).norm() / b.norm()).item() for a, b in zip(ours, cpus)])
    torch.set_float32_matmul_precision(precision)
    # The median drops a batch where rounding flips a LeakyReLU; NaN stays
    return torch.tensor(errors).median(dim=0).values.max().item()


def check_step(run, real, z, device, lr):
    """A train_step from the run's first weights, on `device`."""
    G = copy.deepcopy(run.G).to(device)
    D = copy.deepcopy(run.D).to(device).eval()  # no dropout masks
    stats = train_step(
        G, D, make_optimizer(G, lr), make_optimizer(D, lr), real.to(device), z.to(device))
    params = [[*G.parameters()], [*D.parameters()]]
    grads = [torch.cat([p.grad.flatten() for p in net]) for net in params]
    weights = [torch.cat([p.detach().flatten() for p in net]) for net in params]
    return [t.cpu() for t in (stats, *grads, *weights)]  # float32: MPS has no 64


def seconds_per_step(flags, device, chunk=10):
    """A training step's seconds, over CHECK_SECONDS after a warm-up."""
    run = new_run(flags, device)
    shape = (chunk * flags["batch_size"], *image_shape(flags))
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8).to(device)
    times = []  # the first chunk's is the warm-up's
    while sum(times[1:]) < CHECK_SECONDS:
        start = time.perf_counter()
        stats = list(train_epoch(run.G, run.D, run.opt_G, run.opt_D, pixels,
                                 flags["batch_size"], amp=flags["amp"], ema=run.ema))
        stats[-1].tolist()  # waits for the last step
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / (chunk * (len(times) - 1))


def check_device(flags, device):
    """A GPU's step against the CPU's, then training's speed."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device
    print(f"device {name}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    if device.type != "cpu":  # the CPU: the reference
        error = compare_with_cpu(flags, device)
        if not error <= TOLERANCE:  # NaN fails too
            raise GanError(f"device check failed: {device} differs from the CPU by {error:.1e}")
        print(f"device check passed: {device} matches the CPU to {error:.0e}")
    seconds = seconds_per_step(flags, device)
    batch = flags["batch_size"]
    steps = flags["epochs"] * (60_000 // batch)
    print(f"training: {batch / seconds:,.0f} img/s; {flags['epochs']} epochs of "
          f"MNIST ({steps:,} steps) in {steps * seconds / 60:.1f} min")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


def format_stats(stats):
    return "  ".join(f"{name} {value:.4f}" for name, value in zip(STATS, stats))


def run_folder(args):
    """--out-dir, or a new runs/<date-time>-<random> linked as runs/latest."""
    name = time.strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()
    folder = Path(args.out_dir) if args.out_dir else Path("runs", name)  # None or "": new
    if args.dataset == "folder" and folder.resolve().is_relative_to(args.data_dir):
        raise GanError(f"{folder} is inside --data-dir: give another --out-dir")
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    if not args.out_dir:  # Windows may refuse links
        with contextlib.suppress(OSError), written_whole(Path("runs", "latest")) as tmp:
            tmp.symlink_to(name, target_is_directory=True)
    return folder


def train_part(run, args, pixels):
    """Train to the epoch's end or --max-steps, logged: its grid's name."""
    if run.order is None:  # new each epoch
        run.order = torch.randperm(len(pixels), device=pixels.device)
    sums = torch.zeros(len(STATS), device=pixels.device)
    first_step = run.step
    start = time.perf_counter()
    batches = len(run.order) // args.batch_size
    for stats in train_epoch(run.G, run.D, run.opt_G, run.opt_D, pixels, args.batch_size,
                             run.order[run.done:], args.amp, run.ema):
        sums += stats  # on the device: no waiting
        run.step += 1
        run.done += args.batch_size
        last = run.step >= args.max_steps
        if last or run.step % args.log_every == 0:
            stats = stats.tolist()  # waits for the step: only here
            rate = (run.step - first_step) * args.batch_size / (time.perf_counter() - start)
            run.metrics.append({"epoch": run.epoch + 1, "step": run.step,
                                **dict(zip(STATS, stats)), "images_per_s": round(rate)})
            batch = run.done // args.batch_size
            print(f"[{run.epoch + 1}/{args.epochs}][{batch}/{batches}] step {run.step}  "
                  f"{format_stats(stats)}  {rate:,.0f} img/s", flush=True)
        if last:
            break
    means = (sums / (run.step - first_step)).tolist()  # one wait
    if not all(p.isfinite().all() for p in run.G.parameters()):
        raise GanError(f"diverged by step {run.step}; try a smaller --lr")
    completed = len(run.order) - run.done < args.batch_size
    state = "done" if completed else "stopped"
    print(f"epoch {run.epoch + 1}/{args.epochs} {state}: mean {format_stats(means)}  "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    if not completed:
        return f"step_{run.step:07d}.png"
    run.epoch += 1
    run.order = None
    run.done = 0
    return f"epoch_{run.epoch:03d}.png"


def train(args, device):
    """Train to --epochs or --max-steps: the exit code."""
    # Absolute: resume and --eval find it anywhere
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.dataset == "folder":
        pixels = read_folder(args.data_dir, args.channels, args.image_size)
    else:
        pixels = load_dataset(args.dataset, args.data_dir)[0]
    pixels = pixels.to(device)
    if args.batch_size > len(pixels):
        raise GanError(f"--batch-size {args.batch_size}: only {len(pixels)} images")
    flags = {name: getattr(args, name) for name in sorted(SAVED)}
    run = new_run(flags, device, args.run_checkpoint)
    if run.order is not None and len(run.order) != len(pixels):
        raise GanError(f"the run's epoch has {len(run.order)} images, "
                       f"{args.data_dir} now {len(pixels)}: put them back")
    run_dir = run_folder(args)
    own = checkpoint_file(run_dir).resolve()
    if args.resume is None or checkpoint_file(args.resume).resolve() != own:
        try:  # a new run, or a resume into another folder
            save_checkpoint(run, flags, run_dir, exclusive=True)
        except FileExistsError:
            raise GanError(f"{run_dir} already holds a run: --resume {run_dir}, "
                           "or another --out-dir") from None
    print(f"device {device}  torch {torch.__version__}  amp {args.amp}\n"
          f"{len(pixels)} images, run folder {run_dir}\nflags {json.dumps(flags)}", flush=True)
    if run.epoch >= args.epochs or run.step >= args.max_steps:
        print(f"nothing to train: the run is at step {run.step}")
    saved_step = run.step
    try:
        while run.epoch < args.epochs and run.step < args.max_steps:
            grid = train_part(run, args, pixels)
            save_checkpoint(run, flags, run_dir)
            saved_step = run.step
            save_grid(sample(run.ema.G, run.fixed_noise), run_dir / "samples" / grid)
            save_metrics(run.metrics, run_dir / "metrics.csv")
            plot_losses(run.metrics, len(pixels) // args.batch_size, run_dir / "losses.png")
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
    source = checkpoint_file(args.checkpoint)
    out = args.out
    if not out.parent.is_dir():
        raise GanError(f"--out {out}: no folder {out.parent}")
    in_samples = out.parent.name == "samples"  # a run's grids
    run_dir = out.parent.parent if in_samples else out.parent
    own = in_samples or out.name in RUN_FILES
    if out.resolve() == source.resolve() or (own and checkpoint_file(run_dir).exists()):
        raise GanError(f"--out {out} is for a run's own files")
    checkpoint = args.run_checkpoint  # as parse_args read it
    G = load_generator(source, device, checkpoint)
    rng = torch.Generator().manual_seed(args.seed)  # on the CPU: any device, same z
    z = torch.randn(args.generate, G.latent_dim, generator=rng)
    images = sample(G, z.to(device)).cpu()
    if out.suffix.lower() == ".pt":
        with written_whole(out) as tmp, open(tmp, "wb") as f:
            torch.save(images, f)
    else:
        save_grid(images, out)
    print(f"wrote {len(images)} images to {out}: the averaged G at step "
          f"{checkpoint['step']} (epochs done: {checkpoint['epoch']})")
    if args.eval:
        report_quality(images, args.dataset, args.data_dir, device)
    return 0


# Tutorials' setups, trained by train_step: no dropout in D, no averaged G
TUTORIAL = {"latent_dim": 100, "g_activation": "relu", "g_batchnorm": False,
            "d_dropout": 0.0, "ema_decay": 0.0, "batch_size": 128, "lr": 2e-4}
CONFIGS = {
    "shallow": {**TUTORIAL, "g_hidden": [128], "d_hidden": [128], "batch_size": 64, "epochs": 100},
    "classic": {**TUTORIAL, "g_hidden": [256, 512], "g_activation": "leaky-relu",
                "d_hidden": [512, 256], "epochs": 50},
    "deep": {**TUTORIAL, "g_hidden": [256, 512, 1024], "d_hidden": [1024, 512, 256], "epochs": 20},
    "batchnorm": {**TUTORIAL, "latent_dim": 64, "g_batchnorm": True, "epochs": 500, "lr": 1e-5,
                  "g_hidden": [128, 256, 512, 1024], "d_hidden": [1024, 512, 256]},
}
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def checked(cast, is_valid, expected):
    """An argparse type: `cast`, then refused unless `is_valid`."""
    def number(text):
        value = cast(text)
        if not is_valid(value):
            raise argparse.ArgumentTypeError(f"{text} is not {expected}")
        return value
    return number


positive_int = checked(int, lambda n: n > 0, "positive")
positive = checked(float, lambda x: 0 < x < math.inf, "positive")
fraction = checked(float, lambda x: 0 <= x < 1, "in [0, 1)")
seed_type = checked(int, lambda n: 0 <= n < 2**64, "a seed in [0, 2**64)")
device_type = checked(str, lambda x: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", x), DEVICES)


def build_parser():
    parser = argparse.ArgumentParser(
        "vanilla_gan.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, help="a tutorial's setup; typed flags win")
    parser.add_argument(
        "--epochs", type=positive_int, default=50, help="passes over the data")
    parser.add_argument("--max-steps", type=positive_int, default=math.inf, help="step to stop at")
    parser.add_argument(
        "--device", type=device_type, default="auto",
        help=f"{DEVICES}; auto: cuda, else mps, else cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument(
        "--seed", type=seed_type, default=42,
        help="of weights, noise, order, dropout")
    parser.add_argument(
        "--dataset", default="mnist", choices=[*DATASETS, "folder"],
        help="folder: your images")
    parser.add_argument(
        "--data-dir", default="data", help="holds MNIST/raw/ etc., or your images")
    parser.add_argument(
        "--channels", type=int, choices=[1, 3], default=1, help="folder: grey or RGB")
    parser.add_argument(
        "--image-size", type=positive_int, default=28, help="folder: side to fit to")
    parser.add_argument(
        "--latent-dim", type=positive_int, default=100, help="z's size")
    parser.add_argument(
        "--g-hidden", type=positive_int, nargs="+", metavar="W", default=[256, 512, 1024],
        help="G's widths")
    parser.add_argument(
        "--g-activation", choices=ACTIVATIONS, default="leaky-relu",
        help="G's activation")
    parser.add_argument(
        "--g-batchnorm", action="store_true", help="BatchNorm before each activation in G")
    parser.add_argument(
        "--d-hidden", type=positive_int, nargs="+", metavar="W", default=[512, 256],
        help="D's widths")
    parser.add_argument(
        "--d-dropout", type=fraction, default=0.3, help="Dropout in D, 0 for none")
    parser.add_argument(
        "--ema-decay", type=fraction, default=0.9995,
        help="of G's average; 0 samples G itself")
    parser.add_argument(
        "--batch-size", type=positive_int, default=128, help="real images per step")
    parser.add_argument(
        "--lr", type=positive, default=3e-4, help="Adam's lr, G's and D's")
    parser.add_argument("--out-dir", help="the run folder; none: a new one in runs/")
    parser.add_argument(
        "--log-every", type=positive_int, default=100, help="steps between logs")
    parser.add_argument(
        "--eval", action="store_true", help="FID and class shares of the samples (not folder)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", metavar="RUN", help="continue a run folder or checkpoint")
    mode.add_argument(
        "--generate", type=positive_int, metavar="N", help="only make N images from --checkpoint")
    mode.add_argument(
        "--check-device", nargs="?", const="auto", type=device_type, metavar="DEVICE",
        help="only check a device (auto if none given) and its speed")
    parser.add_argument("--checkpoint", metavar="RUN", help="--generate's run folder or checkpoint")
    parser.add_argument(
        "--out", type=Path, help="--generate's grid (.png, .jpg, ...) or tensor (.pt)")
    return parser


def parse_args(argv=None):
    """Each flag as typed, else --config's, else the run's, else default."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generate and not args.checkpoint:
        parser.error("--generate needs --checkpoint")
    if not args.generate and (args.checkpoint or args.out):
        parser.error("--checkpoint and --out go with --generate")
    saved = {}
    source = args.checkpoint if args.generate else args.resume
    checkpoint = None
    if source:
        path = checkpoint_file(source)
        checkpoint = load_checkpoint(path)
        saved = checkpoint["args"]
        folder = path.resolve().parent
        parser.set_defaults(**saved, out_dir=str(folder), out=path.parent / "generated.png")
    if args.config:  # over the run's: a change is refused below
        parser.set_defaults(**CONFIGS[args.config])
    args = parser.parse_args(argv)  # again, with those defaults
    args.run_checkpoint = checkpoint  # read once: a trainer may be saving anew
    kept = KEPT & saved.keys()
    if args.generate:
        kept.discard("seed")  # --generate's seed draws z
    for name in sorted(kept):
        value = getattr(args, name)
        if value != saved[name]:
            flag = f"--{name.replace('_', '-')}"
            raise GanError(f"the run has {flag} {saved[name]}, not {value}: a resume keeps it")
    reads_data = args.resume is not None or args.eval
    gone = not Path(args.data_dir).exists()
    if saved and reads_data and gone and args.data_dir == saved["data_dir"]:
        raise GanError(f"the run's data folder {args.data_dir} is gone: give --data-dir")
    if args.eval and args.dataset == "folder":
        parser.error("--eval needs a built-in dataset, not folder")
    if args.dataset != "folder" and image_shape(vars(args)) != IMAGE_SHAPE:
        parser.error("--channels and --image-size are for folder")
    return args


def main(argv=None):
    """The command line: main(["--epochs", "1"]) returns the code."""
    argv = None if argv is None else [str(arg) for arg in argv]  # Paths, numbers too
    precision = torch.get_float32_matmul_precision()
    try:
        args = parse_args(argv)
        if args.check_device:
            check_device(vars(args), pick_device(args.check_device))
            return 0
        device = pick_device(args.device)
        if args.generate:
            return generate(args, device)
        return train(args, device)
    except SystemExit as e:  # --help and argparse's errors
        return e.code  # returned: a notebook survives them
    except KeyboardInterrupt:  # Ctrl-C before training
        print("interrupted", file=sys.stderr)
        return 130
    except (GanError, OSError) as e:  # OSError: in Python's words
        print(f"vanilla_gan.py: error: {e}", file=sys.stderr)
        return 1
    finally:  # the caller's precision back (notebooks)
        torch.set_float32_matmul_precision(precision)


if __name__ == "__main__":
    sys.exit(main())

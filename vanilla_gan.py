"""A vanilla GAN (Goodfellow et al., 2014) on MNIST, in one file.

The Generator G turns random noise z into images; the Discriminator D tells real digits from G's
fakes, and G learns to fool it. The GAN comes first; below the marked line, the script around it.
"""
import argparse
import contextlib
import copy
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)  # every image here, with values in [-1, 1]
ACTIVATIONS = {"leakyrelu": lambda: nn.LeakyReLU(0.2), "relu": nn.ReLU}


def mlp(widths, activation, batchnorm=False, dropout=0.0):
    """Linear layers; each hidden one followed by (BatchNorm,) the activation (, Dropout)."""
    layers = []
    for width_in, width_out in zip(widths[:-2], widths[1:-1]):
        layers.append(nn.Linear(width_in, width_out))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width_out))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
    return [*layers, nn.Linear(widths[-2], widths[-1])]


class Generator(nn.Module):
    """Noise z (N, latent_dim) -> images (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, latent_dim=100, hidden=(256, 512, 1024), activation="leakyrelu",
                 batchnorm=False):
        super().__init__()
        self.latent_dim = latent_dim
        layers = mlp([latent_dim, *hidden, 28 * 28], activation, batchnorm)
        self.net = nn.Sequential(*layers, nn.Tanh())  # Tanh: the range of the scaled data

    def forward(self, z):
        return self.net(z).view(-1, *IMAGE_SHAPE)


class Discriminator(nn.Module):
    """Images (N, 1, 28, 28) -> one logit each, log(p / (1 - p)) for p = P(real)."""

    def __init__(self, hidden=(512, 256), dropout=0.3):
        super().__init__()
        # LeakyReLU: a gradient for negative inputs too, so D never goes silent on G. Dropout:
        # a noisier critic that cannot memorise the digits. No Sigmoid: the loss applies it.
        layers = mlp([28 * 28, *hidden, 1], "leakyrelu", dropout=dropout)
        self.net = nn.Sequential(nn.Flatten(), *layers)

    def forward(self, images):
        return self.net(images)


def make_optimizer(net, lr=3e-4, betas=(0.5, 0.999)):
    # beta1 = 0.5, not 0.9: shorter momentum, so each network follows the other's latest moves
    # (Radford et al., 2015). lr 3e-4: the usual 2e-4 needs ~100 epochs to match its 50.
    # fused: one kernel for all the weights.
    fused = next(net.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(net.parameters(), lr=lr, betas=betas, fused=fused)


# BCE of a logit l and a label y: -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))].
# Taking logits keeps it exact where sigmoid(l) would round to 0 or 1 and the log blow up.
bce = nn.BCEWithLogitsLoss()


def train_step(G, D, opt_G, opt_D, real, z, amp=False):
    """One D update, then one G update. Returns [Loss_D, Loss_G, D(x), D(G(z))], left on the
    device: reading it would make the host wait."""
    # --amp: products in bfloat16. Off: no autocast at all (torch 2.4 lacks it on MPS).
    autocast = torch.autocast(real.device.type, torch.bfloat16) if amp else contextlib.nullcontext()
    n = len(real)
    with autocast:
        fake = G(z)  # one fake batch serves both updates
        # D maximises log D(x) + log(1 - D(G(z))). detach(): this update must not reach G.
        logits = D(torch.cat([real, fake.detach()])).float()  # one pass over both halves
        real_logits, fake_logits = logits[:n], logits[n:]
        loss_D = (bce(real_logits, torch.ones_like(real_logits))
                  + bce(fake_logits, torch.zeros_like(fake_logits)))
    opt_D.zero_grad()
    loss_D.backward()
    opt_D.step()

    # G maximises log D(G(z)), the non-saturating loss: minimising log(1 - D(G(z))) gives G
    # no gradient just when D rejects its fakes. D is frozen: G's gradient flows through it.
    D.requires_grad_(False)
    try:
        with autocast:
            fooled_logits = D(fake).float()  # the updated D judges the same fakes
            loss_G = bce(fooled_logits, torch.ones_like(fooled_logits))
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()
    finally:  # even if interrupted (a notebook's stop button)
        D.requires_grad_(True)

    # D(x) and D(G(z)) as probabilities: both 0.5 at the equilibrium.
    return torch.stack([loss_D, loss_G, torch.sigmoid(real_logits).mean(),
                        torch.sigmoid(fake_logits).mean()]).detach()


class EMA:
    """A moving average of G's weights (Karras et al., 2018). It takes no part in the game;
    we sample from it: it is steadier than the last step's G."""

    def __init__(self, G, decay=0.9995):
        self.G, self.decay, self.steps = copy.deepcopy(G).requires_grad_(False), decay, 0

    @torch.no_grad()
    def update(self, G):
        self.steps += 1
        # Warm-up: early on, average over about the last tenth of the steps, not the start
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for averaged, live in zip(self.G.parameters(), G.parameters()):
            averaged.lerp_(live, 1 - decay)  # averaged += (1 - decay) (live - averaged)
        for averaged, live in zip(self.G.buffers(), G.buffers()):
            averaged.copy_(live)  # BatchNorm's running statistics: copied, not averaged


def to_unit_range(pixels):
    """uint8 pixels (N, 28, 28) in 0..255 -> floats (N, 1, 28, 28) in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0).unsqueeze(1)


def train_epoch(G, D, opt_G, opt_D, pixels, batch_size, order=None, amp=False, ema=None):
    """One pass over `pixels`, the uint8 training set on the device, in batches of the indices
    in `order` (default: a fresh permutation). Yields each step's stats."""
    if order is None:
        order = torch.randperm(len(pixels), device=pixels.device)
    # Full batches, indexed from a tensor already on the device: no DataLoader, no copies
    for start in range(0, len(order) - batch_size + 1, batch_size):
        real = to_unit_range(pixels[order[start:start + batch_size]])
        z = torch.randn(batch_size, G.latent_dim, device=pixels.device)
        stats = train_step(G, D, opt_G, opt_D, real, z, amp)
        if ema is not None:
            ema.update(G)
        yield stats


@torch.no_grad()
def sample(G, z):
    """G in eval mode: BatchNorm uses running statistics, so an image depends on its z alone."""
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
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "fake": None}


def load_dataset(name, data_dir, train=True):
    """One split's uint8 images (N, 28, 28) and labels (N,)."""
    if name == "fake":  # random pixels, the same every run
        gen = torch.Generator()
        return torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8, generator=gen), None
    import torchvision
    from torchvision.datasets.utils import check_integrity
    dataset = getattr(torchvision.datasets, DATASETS[name])
    raw = Path(data_dir) / dataset.__name__ / "raw"
    try:
        data = dataset(root=data_dir, train=train, download=True)
    except (OSError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[-1]
        names = [gz.removesuffix(".gz") for gz, _ in dataset.resources]
        missing = [file for file in names if not any(raw.glob(f"{file}*"))]  # or its .gz
        damaged = [gz for gz, md5 in dataset.resources
                   if (raw / gz).exists() and not check_integrity(str(raw / gz), md5)]
        if damaged or not missing:
            raise GanError(f"damaged files in {raw}: {', '.join(damaged) or reason}") from e
        raise GanError(f"{raw} lacks {', '.join(missing)}, and downloading failed ({reason}); "
                       "put them there, or fix --data-dir") from e
    return data.data, data.targets


# ---- Checkpoints ----
STATS = ("Loss_D", "Loss_G", "D(x)", "D(G(z))")  # what train_step returns
# The flags a resumed run keeps; SAVED adds those it may change.
KEPT = {"latent_dim", "g_hidden", "g_activation", "g_batchnorm", "d_hidden", "d_dropout",
        "ema_decay", "dataset", "batch_size", "seed"}
SAVED = KEPT | {"epochs", "lr", "log_every", "data_dir"}
NETWORKS = ("G", "D", "opt_G", "opt_D")
PROGRESS = ("epoch", "step", "order", "done", "fixed_noise", "metrics")


@dataclass
class Run:
    """A training run; checkpoint.pt holds it and the random number states."""
    G: Generator
    D: Discriminator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    ema: EMA  # grids, --generate and --eval sample its G
    fixed_noise: torch.Tensor  # every grid's noise, so grids compare across epochs
    epoch: int = 0  # epochs completed
    step: int = 0  # one D and one G update each
    order: torch.Tensor = None  # the image order of the epoch under way
    done: int = 0  # images of `order` trained on so far
    metrics: list = field(default_factory=list)  # one row per logged step


def new_run(args, device, checkpoint=None):
    torch.manual_seed(args.seed)  # seeds weights, grid noise, batch orders, z and dropout
    G = Generator(args.latent_dim, args.g_hidden, args.g_activation, args.g_batchnorm).to(device)
    D = Discriminator(args.d_hidden, args.d_dropout).to(device)
    opt_G, opt_D = make_optimizer(G, args.lr), make_optimizer(D, args.lr)
    fixed_noise = torch.randn(64, args.latent_dim).to(device)
    run = Run(G, D, opt_G, opt_D, EMA(G, args.ema_decay), fixed_noise)
    if checkpoint is None:
        return run
    for name in NETWORKS:
        getattr(run, name).load_state_dict(checkpoint[name])
    run.ema.G.load_state_dict(checkpoint["G_avg"])
    run.ema.steps = checkpoint["step"]
    for group in run.opt_G.param_groups + run.opt_D.param_groups:  # --lr, this machine's Adam
        group.update(lr=args.lr, fused=run.opt_G.defaults["fused"])
    for name in PROGRESS:
        value = checkpoint[name]
        setattr(run, name, value.to(device) if isinstance(value, torch.Tensor) else value)
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    return run


def save_checkpoint(run, args, run_dir, claim=False):
    flags = {name: getattr(args, name) for name in SAVED}
    rng = {"cpu": torch.get_rng_state()}
    if run.fixed_noise.is_cuda:  # the GPU's own generator draws z and dropout there
        rng["cuda"] = torch.cuda.get_rng_state(run.fixed_noise.device)
    checkpoint = {"args": flags, "rng": rng, "G_avg": run.ema.G.state_dict(),
                  **{name: getattr(run, name).state_dict() for name in NETWORKS},
                  **{name: getattr(run, name) for name in PROGRESS}}
    write_atomically(run_dir / "checkpoint.pt", lambda f: torch.save(checkpoint, f), claim)
    columns = ["epoch", "step", *STATS, "images_per_s"]
    rows = [columns] + [[str(row[column]) for column in columns] for row in run.metrics]
    csv = "".join(",".join(row) + "\n" for row in rows).encode()
    write_atomically(run_dir / "metrics.csv", lambda f: f.write(csv))


def write_atomically(path, write, claim=False):
    """write() to a temporary file, then rename it: a failure leaves the old `path` whole."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        if claim:
            os.link(tmp, path)  # atomic, and refused if `path` exists
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # the clean-up must not mask the real error
            tmp.unlink()


def load_checkpoint(path):
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise GanError(f"no checkpoint at {path}")
    try:  # weights_only: loading runs no code
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle's, zip's or torch's own errors
        raise GanError(f"{path} is damaged or not a vanilla_gan checkpoint") from e
    keys = {"args", "rng", "G_avg", *NETWORKS, *PROGRESS}
    if not isinstance(checkpoint, dict) or not keys <= checkpoint.keys():
        raise GanError(f"{path} is not a vanilla_gan checkpoint")
    return path, checkpoint


def claim_run_folder(run, args, resumed=None):
    """A new run claims its folder by creating checkpoint.pt: a second run there is refused."""
    run_dir = Path(args.out_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        if resumed and (run_dir / "checkpoint.pt").resolve() == resumed.resolve():
            return run_dir
        save_checkpoint(run, args, run_dir, claim=True)
    except FileExistsError:
        raise GanError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                       "or choose another --out-dir") from None
    except OSError as e:
        raise GanError(f"cannot write in {run_dir} ({e.strerror})") from e
    return run_dir


# ---- Outputs ----
def save_grid(images, path):
    from torchvision.utils import save_image
    nrow = math.ceil(len(images) ** 0.5)  # square: 8 x 8 for fixed_noise
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))


# Each curve's value when D can only guess, D(x) = D(G(z)) = 1/2
EQUILIBRIA = {"Loss_D": 2 * math.log(2), "Loss_G": math.log(2), "D(x)": 0.5, "D(G(z))": 0.5}


def plot_losses(rows, steps_per_epoch, path):
    from matplotlib.figure import Figure  # no GUI backend, no global state
    fig = Figure(figsize=(10, 4), layout="constrained")
    epochs = [row["step"] / steps_per_epoch for row in rows]
    for ax, keys in zip(fig.subplots(1, 2), (STATS[:2], STATS[2:])):
        for key in keys:
            line, = ax.plot(epochs, [row[key] for row in rows], ".-", label=key)
            ax.axhline(EQUILIBRIA[key], color=line.get_color(), linestyle="--")
        ax.set(xlabel="epoch", title="D guessing: the dashed lines")
        ax.legend()
    fig.savefig(path, dpi=100)
    return fig


# ---- The quality report ----
def train_classifier(images, labels, device, epochs=3, batch_size=128):
    """The judge: a small seeded CNN (99% on MNIST), whose 128 last features FID uses."""
    with torch.random.fork_rng(devices=[]):  # keeps the GAN's random numbers
        torch.default_generator.manual_seed(0)  # the CPU's alone: fork_rng restores it
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
                              nn.Linear(128, 10)).to(device)
        images, labels = images.to(device), labels.to(device)
        optimizer = torch.optim.Adam(model.parameters())
        steps = epochs * math.ceil(len(images) / batch_size)  # one-cycle: 99% in 3 epochs
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, steps)
        for _ in range(epochs):
            for index in torch.randperm(len(images)).split(batch_size):
                loss = nn.functional.cross_entropy(model(to_unit_range(images[index])),
                                                   labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


@torch.no_grad()
def judge(classifier, images):
    device = classifier[0].weight.device
    features = torch.cat([classifier[:-1](batch.to(device)) for batch in images.split(500)])
    return features.cpu().double(), classifier[-1](features).argmax(1).cpu()  # MPS: no float64


def frechet_distance(a, b):
    """FID: fit a Gaussian to each set; ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    # Tr((C_a C_b)^(1/2)): the sum of the roots of C_a C_b's eigenvalues; .real drops rounding
    cross = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return ((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace()
            - 2 * cross).item()


EVAL_SAMPLES = 10_000  # FID falls as N grows: figures compare only at the same N


def report_quality(images, dataset, data_dir, device):
    """FID against the test set, and the class shares."""
    train_set, test_set = (load_dataset(dataset, data_dir, train) for train in (True, False))
    print("training the judge", flush=True)
    classifier = train_classifier(*train_set, device)
    features, classes = judge(classifier, images)
    fid = frechet_distance(features, judge(classifier, to_unit_range(test_set[0]))[0])
    shares = torch.bincount(classes, minlength=10) / len(images)
    few = " (too few samples to compare)" if len(images) < EVAL_SAMPLES else ""
    print(f"quality of {len(images)} samples: FID {fid:.2f}{few}, rarest class "
          f"{shares.argmin().item()} at {shares.min().item():.1%}", flush=True)
    return fid, shares


# ---- The command line ----
# Classic setups: --config NAME makes these the defaults; typed flags win.
CONFIGS = {
    "classic": dict(g_hidden=[256, 512], d_hidden=[512, 256], d_dropout=0.0, lr=2e-4,
                    ema_decay=0.999),
    "minimal": dict(g_hidden=[128], g_activation="relu", d_hidden=[128], d_dropout=0.0,
                    batch_size=64, epochs=100, lr=2e-4, ema_decay=0.999),
    "deep": dict(g_hidden=[256, 512, 1024], g_activation="relu", d_hidden=[1024, 512, 256],
                 d_dropout=0.0, epochs=20, lr=2e-4, ema_decay=0.999),
    "batchnorm": dict(g_hidden=[128, 256, 512, 1024], g_activation="relu", g_batchnorm=True,
                      d_hidden=[1024, 512, 256], d_dropout=0.0, latent_dim=64, lr=1e-5,
                      epochs=500),
}


def checked(cast, is_valid, name):
    """An argparse type: `cast` the text, refuse it if not `is_valid`."""
    def parse(text):
        if not is_valid(value := cast(text)):
            raise ValueError(text)
        return value
    parse.__name__ = name  # argparse says "invalid <name> value"
    return parse


positive_int = checked(int, lambda v: v > 0, "positive integer")
positive_float = checked(float, lambda v: 0 < v < math.inf, "positive number")  # not nan
fraction = checked(float, lambda v: 0 <= v < 1, "fraction in [0, 1)")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
device_name = checked(str, lambda v: v in ("auto", "cpu", "cuda", "mps")
                      or v.startswith("cuda:") and v[5:].isdigit(), f"device ({DEVICES})")


def build_parser():
    p = argparse.ArgumentParser("vanilla_gan.py",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--config", choices=CONFIGS, help="a classic setup; typed flags win")
    add("--epochs", type=positive_int, default=50, help="passes over the training set")
    add("--max-steps", type=positive_int, help="stop at this step (None: no limit)")
    add("--device", type=device_name, default="auto", help=f"{DEVICES}; auto: cuda, mps, cpu")
    add("--amp", action="store_true", help="bfloat16 autocast")
    add("--seed", type=int, default=42, help="seeds weights, noise, batch order and dropout")
    add("--dataset", choices=DATASETS, default="mnist", help="fake: random pixels")
    add("--data-dir", default="data", help="holds MNIST/raw/ (or the dataset's folder)")
    add("--latent-dim", type=positive_int, default=100, help="size of the noise vector z")
    add("--g-hidden", type=positive_int, nargs="+", default=[256, 512, 1024], help="G's widths")
    add("--g-activation", choices=ACTIVATIONS, default="leakyrelu", help="G's activation")
    add("--g-batchnorm", action="store_true", help="BatchNorm1d in G's hidden layers")
    add("--d-hidden", type=positive_int, nargs="+", default=[512, 256], help="D's widths")
    add("--d-dropout", type=fraction, default=0.3, help="Dropout in D's hidden layers")
    add("--ema-decay", type=fraction, default=0.9995, help="decay of G's average (0: G itself)")
    add("--batch-size", type=positive_int, default=128, help="real images per step")
    add("--lr", type=positive_float, default=3e-4, help="Adam's learning rate, both networks")
    add("--out-dir", help="the run folder (None: a new runs/<date-time>)")
    add("--log-every", type=positive_int, default=100, help="print and record every N steps")
    add("--eval", action="store_true", help="report FID and class shares at the end")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="RUN", help="continue a run folder or checkpoint.pt")
    start.add_argument("--generate", type=positive_int, metavar="N",
                       help="only generate N images from --checkpoint")
    add("--checkpoint", metavar="RUN", help="for --generate: a run folder or its checkpoint.pt")
    add("--out", type=Path, help="for --generate: an image or a .pt tensor "
        "(None: generated.png beside the checkpoint)")
    return p


def parse_args(argv=None):
    """Each flag from the first that sets it: typed, --config, the checkpoint, the defaults."""
    parser = build_parser()
    typed = parser.parse_args(argv)
    if typed.generate and not typed.checkpoint:
        parser.error("--generate needs --checkpoint")
    if not typed.generate and (typed.checkpoint or typed.out):
        parser.error("--checkpoint and --out go with --generate")
    if typed.generate and typed.eval and typed.generate <= 128:  # for a full-rank covariance
        parser.error("--eval needs 129+ samples: the judge has 128 features")
    loaded = None
    if typed.resume or typed.generate:
        loaded = load_checkpoint(typed.checkpoint or typed.resume)
        parser.set_defaults(**loaded[1]["args"], out_dir=str(loaded[0].parent))
    parser.set_defaults(**CONFIGS.get(typed.config, {}))
    args = parser.parse_args(argv)
    if args.eval and args.dataset == "fake":
        parser.error("--eval needs real data, not --dataset fake")
    saved = loaded[1]["args"] if loaded else {}
    for name in sorted(KEPT - {"seed"} if args.generate else KEPT):  # --generate: z's seed
        if name in saved and getattr(args, name) != saved[name]:
            raise GanError(f"the run has --{name.replace('_', '-')} {saved[name]}, not "
                           f"{getattr(args, name)}: drop the flag (a run keeps it)")
    return args, loaded


def pick_device(name):
    if name == "auto":
        mps = torch.backends.mps.is_available()
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    device = torch.device(name)
    if (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
            or device.type == "mps" and not torch.backends.mps.is_available()):
        raise GanError(f"--device {name}: no such device here (try --device cpu)")
    return device


# ---- The device check ----
DEVICE_TOLERANCE = 1e-4  # rounding differs by ~1e-6; a layer off by 0.5% errs by ~1e-2


def device_check(args, device, batches=5):
    """The run's first step, in float32 (no TF32, autocast or dropout), on `device` and the CPU,
    for a few batches: stats and gradients must agree."""
    with torch.random.fork_rng(devices=[]):  # keeps the CPU's random numbers
        run = new_run(args, torch.device("cpu"))
        real = torch.rand(batches, args.batch_size, *IMAGE_SHAPE) * 2 - 1
        z = torch.randn(batches, args.batch_size, args.latent_dim)
    precision, results = torch.get_float32_matmul_precision(), []
    torch.set_float32_matmul_precision("highest")
    for where in (device, torch.device("cpu")):
        for x, noise in zip(real, z):
            G, D = copy.deepcopy(run.G).to(where), copy.deepcopy(run.D).to(where).eval()
            opt_G, opt_D = make_optimizer(G, args.lr), make_optimizer(D, args.lr)
            stats = train_step(G, D, opt_G, opt_D, x.to(where), noise.to(where))
            grads = [torch.cat([p.grad.flatten() for p in net.parameters()]) for net in (G, D)]
            finite = all(p.isfinite().all() for p in [*G.parameters(), *D.parameters()])
            results.append([t.double().cpu() for t in (stats, *grads, torch.tensor(float(finite)))])
    torch.set_float32_matmul_precision(precision)
    # The median drops a batch where rounding flips a LeakyReLU's side; NaN stays NaN.
    errors = torch.tensor([[((a - b).norm() / b.norm()).item() for a, b in zip(*pair)]
                           for pair in zip(results[:batches], results[batches:])])
    worst = errors.median(dim=0).values.max().item()
    if not worst <= DEVICE_TOLERANCE:
        raise GanError(f"device check failed: {device} differs from the CPU by {worst:.1e} "
                       f"(tolerance {DEVICE_TOLERANCE:g})")
    print(f"device check passed: {device} matches the CPU to {worst:.0e}", flush=True)


# ---- Training and generating ----
DIVERGED = 100.0  # a BCE loss this large: D's sigmoid is saturated for good


class StopRequest:
    """Ctrl-C or SIGTERM: finish the step, save, exit."""
    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: saving after this step")

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train(args, loaded):
    """Train to --epochs or --max-steps, or until a stop request; return the exit code."""
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores
    if args.dataset == "fake" and device.type == "cpu":
        print("no device check: the CPU is its reference")
    elif args.dataset == "fake":  # before the run draws random numbers
        device_check(args, device)
    args.data_dir = str(Path(args.data_dir).resolve())  # a resumed run may start elsewhere
    pixels = load_dataset(args.dataset, args.data_dir)[0].to(device)
    if args.batch_size > len(pixels):
        raise GanError(f"--batch-size {args.batch_size} exceeds the {len(pixels)} images")
    path, checkpoint = loaded or (None, None)
    run = new_run(args, device, checkpoint)
    run_dir = claim_run_folder(run, args, path)
    steps_per_epoch = len(pixels) // args.batch_size
    last_step = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device
    print(f"device {name}  torch {torch.__version__}  amp {args.amp}\n"
          f"{args.dataset}: {len(pixels)} training images, run folder {run_dir}")
    if run.step >= last_step:
        print(f"nothing to train: the run is at step {run.step} of {last_step}")
    with StopRequest() as stop:
        while run.step < last_step and stop.signal is None:
            if run.order is None:  # a fresh order each epoch; a resumed epoch keeps its own
                run.order = torch.randperm(len(pixels), device=device)
            sums, first_step, start = torch.zeros(4, device=device), run.step, time.perf_counter()
            for stats in train_epoch(run.G, run.D, run.opt_G, run.opt_D, pixels, args.batch_size,
                                     run.order[run.done:], args.amp, run.ema):
                sums += stats  # on the device: no waiting
                run.step, run.done = run.step + 1, run.done + args.batch_size
                stopping = run.step >= last_step or stop.signal is not None
                if stopping or run.step % args.log_every == 0:  # .tolist() waits: only here
                    rate = (run.step - first_step) * args.batch_size / (time.perf_counter() - start)
                    log_step(run, args, steps_per_epoch, stats.tolist(), rate)
                if stopping:
                    break
            means = (sums / (run.step - first_step)).tolist()  # one wait per epoch
            check_sane(means, run)  # before a save could overwrite good files
            completed = len(run.order) - run.done < args.batch_size
            print(f"epoch {run.epoch + 1}/{args.epochs} {'done' if completed else 'stopped'}: "
                  f"mean {format_stats(means)}  {time.perf_counter() - start:.1f}s", flush=True)
            if completed:
                run.epoch, run.order, run.done = run.epoch + 1, None, 0
            grid = f"epoch_{run.epoch:03d}.png" if completed else f"step_{run.step:07d}.png"
            save_grid(sample(run.ema.G, run.fixed_noise), run_dir / "samples" / grid)
            save_checkpoint(run, args, run_dir)
    del pixels  # less memory at matplotlib's peak
    plot_losses(run.metrics, steps_per_epoch, run_dir / "losses.png")
    if stop.signal:
        print(f"stopped; saved. To resume: python vanilla_gan.py --resume {run_dir}")
        return 128 + stop.signal  # 130 for SIGINT, 143 for SIGTERM
    if args.eval:  # noise of their own, the same in every report
        z = torch.randn(EVAL_SAMPLES, args.latent_dim, generator=torch.Generator().manual_seed(0))
        report_quality(sample(run.ema.G, z.to(device)), args.dataset, args.data_dir, device)
    print(f"done: {run.step} steps. Outputs in {run_dir}")
    return 0


def log_step(run, args, steps_per_epoch, stats, rate):
    check_sane(stats, run)
    run.metrics.append({"epoch": run.epoch + 1, "step": run.step, **dict(zip(STATS, stats)),
                        "images_per_s": round(rate)})
    print(f"[{run.epoch + 1}/{args.epochs}][{run.done // args.batch_size}/{steps_per_epoch}] "
          f"step {run.step}  {format_stats(stats)}  {rate:,.0f} img/s", flush=True)


def format_stats(stats):
    return "  ".join(f"{name} {value:.4f}" for name, value in zip(STATS, stats))


def check_sane(stats, run):
    """Stop a diverged run before it saves: the last good checkpoint stays."""
    bad = [f"{name} {value:.3g}" for name, value in zip(STATS, stats[:2])
           if not abs(value) < DIVERGED]  # NaN too
    if bad or not all(p.isfinite().all() for p in [*run.G.parameters(), *run.D.parameters()]):
        raise GanError(f"training diverged by step {run.step} ({', '.join(bad) or 'weights'} "
                       "too large or NaN); the last checkpoint is kept (try a smaller --lr)")


def generate(args, loaded):
    device = pick_device(args.device)
    G = new_run(args, device, loaded[1]).ema.G  # the averaged G
    # noise drawn on the CPU: a seed gives the same images on any device
    z = torch.randn(args.generate, G.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    images = sample(G, z.to(device)).cpu()
    out = args.out or loaded[0].parent / "generated.png"
    try:
        if out.suffix.lower() == ".pt":
            write_atomically(out, lambda f: torch.save(images, f))
        else:
            save_grid(images, out)
    except (OSError, ValueError) as e:  # ValueError: no image format has this file ending
        raise GanError(f"cannot write {out} ({getattr(e, 'strerror', None) or e})") from e
    print(f"wrote {len(images)} images to {out}")
    if args.eval:
        report_quality(images, args.dataset, args.data_dir, device)
    return 0


def main(argv=None):
    """The command line: main(["--epochs", "1"]) returns the exit code."""
    precision = torch.get_float32_matmul_precision()
    try:
        args, loaded = parse_args(None if argv is None else [str(arg) for arg in argv])
        return generate(args, loaded) if args.generate else train(args, loaded)
    except SystemExit as e:  # --help and argparse's errors: a notebook survives them
        return e.code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop
        print("aborted; files already saved are intact", file=sys.stderr)
        return 130
    except GanError as e:
        print(f"vanilla_gan.py: error: {e}", file=sys.stderr)
        return 1
    finally:  # TF32 off again: a notebook's later float32 products stay exact
        torch.set_float32_matmul_precision(precision)


if __name__ == "__main__":
    sys.exit(main())

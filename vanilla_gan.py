"""A vanilla GAN (Goodfellow et al., 2014) on MNIST, in one file.

Two fully connected networks play a game. The Generator G turns random noise z into images;
the Discriminator D looks at an image and says how likely it is to be real. D learns to tell real
digits from G's fakes, G learns to fool D. At the equilibrium G draws digits D cannot tell apart.

    python vanilla_gan.py --epochs 50 --batch-size 128            # train
    python vanilla_gan.py --resume runs/20261122-101500            # continue a run
    python vanilla_gan.py --generate 64 --checkpoint runs/.../generator.pt

The file reads top to bottom: configuration, data, the two networks, one training step, the
loop, outputs and checkpoints, generating, the quality report, main().
"""
import argparse
import csv
import datetime
import errno
import gzip
import io
import math
import os
import pickle
import shlex
import shutil
import signal
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

FORMAT, FORMAT_VERSION = "vanilla_gan", 1  # written into every file we save, checked on load
IMAGE_SHAPE = (1, 28, 28)
IMAGE_PIXELS = 28 * 28
SAMPLE_GRID = 64  # the fixed-noise grid drawn after every epoch: 8 x 8 digits


class GanError(Exception):
    """A refusal with a message for the user; `code` 2 for bad flags, 1 for everything else."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------
# Configuration: every flag in one place.
# ----------------------------------------------------------------------------------------------

def checked(cast, is_valid, expected):
    """An argparse type: convert the text with `cast`, refuse values that are not `is_valid`."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not is_valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive whole number")
non_negative_int = checked(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive number")  # refuses nan too
adam_beta = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def device_name(text):
    kind, _, index = text.partition(":")
    valid = text in ("auto", "cpu", "mps", "cuda") or (kind == "cuda" and index.isdigit())
    if not valid:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Print each flag's default, except where the help text itself says what happens without it."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line instead of the whole usage block."""

    def error(self, message):
        raise GanError(f"{message} (see --help)", code=2)


def build_parser():
    p = OneLineParser(
        description="Train a vanilla GAN on MNIST, resume a run, or generate digits from a checkpoint.",
        formatter_class=HelpFormatter, allow_abbrev=False)
    run = p.add_argument_group("run")
    run.add_argument("--epochs", type=positive_int, default=50, help="passes over the training set")
    run.add_argument("--max-steps", type=positive_int, default=None,
                     help="stop after this many steps in all (one D and one G update each); for smoke runs")
    run.add_argument("--device", type=device_name, default="auto", help="auto picks cuda, then mps, then cpu")
    run.add_argument("--seed", type=int, default=42, help="seed for weights, noise and batch order")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="bfloat16 autocast (default: on for CPUs with bf16 instructions, where it was "
                          "measured faster)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                     help="torch.compile the two networks (off by default: on a 2-core CPU it compiled for "
                          "35 s and then ran slower)")
    run.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=list(DATASETS), default="mnist",
                      help="'fake' is random noise images: a no-download GPU sanity check")
    data.add_argument("--data-dir", default="data", help="where the dataset lives or is downloaded to")
    model = p.add_argument_group("model")
    model.add_argument("--latent-dim", type=positive_int, default=100, help="size of the noise vector z")
    model.add_argument("--g-hidden", type=positive_int, nargs="+", default=[256, 512], help="G's hidden widths")
    model.add_argument("--d-hidden", type=positive_int, nargs="+", default=[512, 256], help="D's hidden widths")
    model.add_argument("--g-activation", choices=["leakyrelu", "relu"], default="leakyrelu",
                       help="G's hidden activation (D always uses LeakyReLU(0.2))")
    model.add_argument("--g-batchnorm", action="store_true", help="BatchNorm1d after each hidden Linear of G")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=positive_int, default=128, help="real images per step")
    optim.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate, both networks")
    optim.add_argument("--beta1", type=adam_beta, default=0.5, help="Adam beta1, both networks")
    optim.add_argument("--beta2", type=adam_beta, default=0.999, help="Adam beta2, both networks")
    out = p.add_argument_group("output")
    out.add_argument("--out-dir", default=None, help="run folder (default: runs/<date-time>, a new one)")
    out.add_argument("--log-every", type=positive_int, default=100, help="print and record every N steps")
    out.add_argument("--sample-every", type=non_negative_int, default=0,
                     help="also save a sample grid every N steps (0: only at each epoch's end)")
    out.add_argument("--eval", action="store_true",
                     help="after training (or with --generate): FID, Inception Score and class coverage")
    out.add_argument("--eval-every", type=non_negative_int, default=0, metavar="K",
                     help="also evaluate every K epochs (0: never)")
    out.add_argument("--resume", default=None, metavar="PATH",
                     help="continue the run in this checkpoint file or run folder")
    gen = p.add_argument_group("generation (no training)")
    gen.add_argument("--generate", type=positive_int, default=None, metavar="N",
                     help="generate N images from --checkpoint and exit")
    gen.add_argument("--checkpoint", default=None, help="generator.pt or checkpoint.pt to generate from")
    gen.add_argument("--out", default=None,
                     help="output file: .png for a grid, .pt for the raw (N, 1, 28, 28) tensor "
                          "(default: generated.png beside the checkpoint)")
    gen.add_argument("--nrow", type=positive_int, default=8, help="images per row in the grid")
    return p


# Flags that shape the model or the batch order: a resumed run must keep them.
RUN_IDENTITY = ("dataset", "latent_dim", "g_hidden", "d_hidden", "g_activation", "g_batchnorm",
                "batch_size", "seed")
GENERATE_FLAGS = {"generate", "checkpoint", "out", "nrow", "seed", "device", "debug", "eval", "data_dir"}


def parse_args(argv):
    """Return (args, typed): the full configuration and the flags the user actually typed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Parse again into a namespace pre-filled with a marker: argparse leaves it wherever no flag was
    # typed, so what changed is what the user typed (resume needs to know).
    unset = object()
    again = parser.parse_args(argv, argparse.Namespace(**{name: unset for name in vars(args)}))
    typed = {name: value for name, value in vars(again).items() if value is not unset}
    if args.generate is None:
        stray = [f for f in ("checkpoint", "out", "nrow") if f in typed]
        if stray:
            raise GanError(f"--{stray[0]} only works with --generate", code=2)
    else:
        stray = sorted(set(typed) - GENERATE_FLAGS)
        if stray:
            raise GanError(f"--{stray[0].replace('_', '-')} does not apply to --generate "
                           "(the checkpoint defines the model)", code=2)
        if args.checkpoint is None:
            raise GanError("--generate needs --checkpoint PATH (a generator.pt or checkpoint.pt)", code=2)
    if args.dataset == "fake" and (args.eval or args.eval_every):
        raise GanError("no quality report exists for random data (--dataset fake): drop --eval", code=2)
    return args, typed


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GanError(f"--device {name}: no CUDA GPU is available here (try --device cpu)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise GanError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GanError(f"--device {name}: Apple's MPS backend is not available here (try --device cpu)")
    return device


def amp_by_default(device):
    """bfloat16 autocast is on where it was measured faster: CPUs with bf16 instructions (2-core
    AVX512-BF16 machine: 6.0 s instead of 9.2 s an epoch). Elsewhere it is yours to try with --amp."""
    return device.type == "cpu" and cpu_has_bf16()


def cpu_has_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----------------------------------------------------------------------------------------------
# Data: the whole training set as one tensor in [-1, 1], on the training device.
# ----------------------------------------------------------------------------------------------

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "fake": None}
IDX_FILES = {  # file name -> (magic number, shape after the count)
    "train-images-idx3-ubyte": (2051, (28, 28)), "train-labels-idx1-ubyte": (2049, ()),
    "t10k-images-idx3-ubyte": (2051, (28, 28)), "t10k-labels-idx1-ubyte": (2049, ()),
}


def check_idx_file(path, magic, item_shape):
    """Refuse a truncated or foreign IDX file with a message naming it (torchvision would assert)."""
    try:
        with open(path, "rb") as f:
            header = f.read(4 + 4 * (1 + len(item_shape)))
        size = os.path.getsize(path)
    except OSError as e:
        raise GanError(f"cannot read {path}: {e.strerror}")
    if len(header) < 8 or int.from_bytes(header[:4], "big") != magic:
        raise GanError(f"{path} is not an MNIST-format file (wrong magic number; expected {magic}); "
                       "delete it and download the dataset again")
    dims = [int.from_bytes(header[i:i + 4], "big") for i in range(4, len(header), 4)]
    expected = len(header) + math.prod(dims)
    if len(dims) != 1 + len(item_shape) or tuple(dims[1:]) != item_shape or size != expected:
        raise GanError(f"{path} is truncated or corrupt ({size} bytes, the header promises {expected}); "
                       "delete it and download the dataset again")


def load_dataset(dataset, data_dir, train=True):
    """(images, labels): uint8 (N, 28, 28) and int64 (N,), read once through torchvision's own class."""
    if dataset == "fake":  # random pixels: exercises the whole pipeline with no files at all
        generator = torch.Generator().manual_seed(0 if train else 1)
        n = 60_000 if train else 10_000
        return (torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator),
                torch.randint(0, 10, (n,), generator=generator))
    import torchvision  # imported here: generating from a checkpoint needs no dataset code

    cls = getattr(torchvision.datasets, DATASETS[dataset])
    root = Path(data_dir)
    raw = root / DATASETS[dataset] / "raw"
    try:
        if root.exists() and not root.is_dir():
            raise GanError(f"--data-dir {root} is a file, not a folder")
        if not all((raw / name).exists() for name in IDX_FILES):
            unpack_gz(raw)  # .gz files put there by hand or by a package (Debian's Fashion-MNIST)
        if not all((raw / name).exists() for name in IDX_FILES):
            download(cls, root, raw)
        for name, (magic, shape) in IDX_FILES.items():
            check_idx_file(raw / name, magic, shape)
        data = cls(root=str(root), train=train, download=False)
        return data.data, data.targets
    except OSError as e:  # a folder we may not list or read
        raise GanError(f"cannot read {e.filename or root}: {e.strerror}; check --data-dir") from e


def unpack_gz(raw):
    for name in IDX_FILES:
        packed, target = raw / f"{name}.gz", raw / name
        if packed.is_file() and not target.exists():
            tmp = target.with_name(name + ".tmp")
            try:
                with gzip.open(packed) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
                tmp.unlink(missing_ok=True)
                raise GanError(f"cannot unpack {packed}: {e}; delete it and fetch it again") from e
            os.replace(tmp, target)


def download(cls, root, raw):
    """Let torchvision fetch the files; offline, say exactly what to put where."""
    print(f"{cls.__name__} not found in {raw}: downloading it")
    chatter = io.StringIO()  # torchvision prints a line per mirror it tries: keep the error to one line
    try:
        with redirect_stdout(chatter):
            cls(root=str(root), train=True, download=True)
    except Exception as e:  # URLError, HTTPError, RuntimeError('Error downloading ...'), OSError
        files = ", ".join(IDX_FILES)
        raise GanError(f"{cls.__name__} is missing from {raw} and could not be downloaded ({type(e).__name__}). "
                       f"Put the four files there ({files}), or point --data-dir at the folder that "
                       f"holds {cls.__name__}/raw/") from e


def to_unit_range(images_uint8):
    """Pixels 0..255 -> floats -1..1, the range of G's Tanh output, shaped (N, 1, 28, 28)."""
    return images_uint8.float().div_(127.5).sub_(1.0).unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# The two networks.
# ----------------------------------------------------------------------------------------------

def mlp(widths, activation, batchnorm=False):
    """Linear layers of the given widths, each hidden one followed by (BatchNorm and) an activation."""
    layers = []
    for i, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if i < len(widths) - 2:  # hidden layers only
            if batchnorm:
                layers.append(nn.BatchNorm1d(width_out))
            layers.append(activation())
    return layers


def activation_layer(name):
    # LeakyReLU(0.2) keeps a gradient for negative inputs, so D never goes silent on G.
    return {"leakyrelu": lambda: nn.LeakyReLU(0.2), "relu": nn.ReLU}[name]


class Generator(nn.Module):
    """z (N, latent_dim) -> image (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, latent_dim=100, hidden=(256, 512), activation="leakyrelu", batchnorm=False):
        super().__init__()
        layers = mlp([latent_dim, *hidden, IMAGE_PIXELS], activation_layer(activation), batchnorm)
        self.net = nn.Sequential(*layers, nn.Tanh())  # Tanh: the same range as the data

    def forward(self, z):
        return self.net(z).view(-1, *IMAGE_SHAPE)


class Discriminator(nn.Module):
    """Image (N, 1, 28, 28) -> one logit per image: > 0 means 'real'."""

    def __init__(self, hidden=(512, 256)):
        super().__init__()
        layers = mlp([IMAGE_PIXELS, *hidden, 1], activation_layer("leakyrelu"))
        # No Sigmoid: BCEWithLogitsLoss fuses it into the loss, stable where sigmoid saturates.
        self.net = nn.Sequential(nn.Flatten(), *layers)

    def forward(self, x):
        return self.net(x)


def model_args_from(args):
    """What it takes to rebuild both networks; stored in every checkpoint."""
    return {"latent_dim": args.latent_dim, "g_hidden": list(args.g_hidden), "d_hidden": list(args.d_hidden),
            "g_activation": args.g_activation, "g_batchnorm": args.g_batchnorm}


def build_generator(model_args):
    return Generator(model_args["latent_dim"], model_args["g_hidden"], model_args["g_activation"],
                     model_args["g_batchnorm"])


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# One training step: D learns real vs fake, then G learns to fool D.
# ----------------------------------------------------------------------------------------------

# BCE on logits l: -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))], computed in one stable op.
bce = nn.BCEWithLogitsLoss()


def train_step(G, D, opt_G, opt_D, real, z, amp):
    """One D update and one G update. Returns detached [Loss_D, Loss_G, D(x), D(G(z))]."""
    n = real.size(0)
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=amp):
        fake = G(z)  # one fake batch serves both updates
        # D step: maximise log D(x) + log(1 - D(G(z))). detach(): this update must not reach G.
        logits = D(torch.cat([real, fake.detach()]))  # one D pass over real and fake together
        real_logits, fake_logits = logits[:n].float(), logits[n:].float()
        loss_D = (bce(real_logits, torch.ones_like(real_logits))
                  + bce(fake_logits, torch.zeros_like(fake_logits)))
    opt_D.zero_grad(set_to_none=True)  # set_to_none: no memset, the next backward writes fresh
    loss_D.backward()
    opt_D.step()

    # G step, non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z))), whose
    # gradient vanishes exactly when G is bad and D confident. D is frozen: no weight gradients
    # for D are computed, only the gradient flowing back through it into G.
    D.requires_grad_(False)
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=amp):
        fooled_logits = D(fake).float()  # the updated D judges the same fakes
        loss_G = bce(fooled_logits, torch.ones_like(fooled_logits))
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    D.requires_grad_(True)

    # D(x) and D(G(z)) as probabilities: at the equilibrium both tend to 0.5.
    return torch.stack([loss_D, loss_G, torch.sigmoid(real_logits).mean(),
                        torch.sigmoid(fake_logits).mean()]).detach()


def make_optimizer(module, args, device):
    # beta1 = 0.5 instead of 0.9: shorter momentum, so each net reacts to the other's recent moves
    # (Radford et al., 2015). fused: one kernel for the whole update instead of one per tensor.
    return torch.optim.Adam(module.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                            fused=device.type in ("cuda", "cpu"))


# ----------------------------------------------------------------------------------------------
# The loop, with its run state: everything a checkpoint must hold to continue exactly.
# ----------------------------------------------------------------------------------------------

class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(args, run_dir, device, state):
    """Set up and run the loop. `state` is None or a loaded checkpoint; returns (exit code, state)."""
    torch.manual_seed(args.seed)
    # The whole set stays on the device as uint8 (a quarter of float32's memory): no DataLoader, no
    # per-image transforms; each batch is an index slice, scaled to [-1, 1] as it is drawn.
    images = load_dataset(args.dataset, args.data_dir)[0].to(device)
    if args.batch_size > images.size(0):
        raise GanError(f"--batch-size {args.batch_size} is larger than the dataset "
                       f"({images.size(0)} images)", code=2)
    model_args = model_args_from(args)
    G = build_generator(model_args).to(device)
    D = Discriminator(model_args["d_hidden"]).to(device)
    opt_G, opt_D = make_optimizer(G, args, device), make_optimizer(D, args, device)
    print_banner(args, device, run_dir, images.size(0), G, D)
    if state is None:
        state = {"epoch": 0, "batch": 0, "step": 0, "perm": None, "metrics": [], "quality": [],
                 "fixed_noise": torch.randn(SAMPLE_GRID, args.latent_dim).to(device)}
    else:
        restore(state, G, D, opt_G, opt_D, args, device)
    # Compile wrappers for the steps; G and D themselves are saved, so state_dict keys stay plain.
    G_step, D_step = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    write_rows(run_dir / "metrics.csv", METRIC_FIELDS, state["metrics"])  # resumed: what the checkpoint knew

    steps_per_epoch = images.size(0) // args.batch_size  # full batches only: every step has one shape
    last_step = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)
    if state["step"] >= last_step:
        print(f"nothing to do: the run already has {state['step']} steps ({state['epoch']} epochs); "
              "pass a larger --epochs or --max-steps to train on")
        return 0, state
    judge = QualityJudge(args.dataset, args.data_dir, run_dir, device) if args.eval or args.eval_every else None
    clock = {"start": time.perf_counter(), "start_step": state["step"], "last_step": last_step}
    with StopRequest() as stop:
        while state["step"] < last_step and stop.signal is None:
            epoch_start = time.perf_counter()
            means, steps = train_epoch(G_step, D_step, opt_G, opt_D, images, state, args, last_step, stop,
                                       run_dir, G)
            # One sync per epoch: check, then save. A NaN stops here, before the last good checkpoint
            # could be overwritten.
            check_finite({"Loss_D": means[0], "Loss_G": means[1]}, G, D)
            seconds = time.perf_counter() - epoch_start
            epoch = state["epoch"] + 1
            if state["batch"] == steps_per_epoch:
                state["epoch"], state["batch"] = epoch, 0
            print_epoch(epoch, args.epochs, means, seconds, steps, state, clock)
            save_grid(G, state["fixed_noise"], run_dir / "samples" / f"epoch_{epoch:03d}.png")
            if judge and evaluation_due(args, state, last_step):
                state["quality"].append(judge(G, args.latent_dim, epoch, state["step"]))
                write_rows(run_dir / "quality.csv", QUALITY_FIELDS, state["quality"])
            save_checkpoint(run_dir, args, state, G, D, opt_G, opt_D)
    if stop.signal is not None:
        return 128 + stop.signal, state  # 130 for SIGINT, 143 for SIGTERM: the shell's convention
    if args.dataset == "fake":
        report_device_check(G, device, state, clock, args.batch_size)
    return 0, state


def evaluation_due(args, state, last_step):
    every = args.eval_every and state["batch"] == 0 and state["epoch"] % args.eval_every == 0
    return every or (args.eval and state["step"] >= last_step)


def train_epoch(G, D, opt_G, opt_D, images, state, args, last_step, stop, run_dir, G_to_sample):
    """Steps until the epoch ends, the run's last step, or a stop request. Returns (means, steps)."""
    device, batch_size = images.device, args.batch_size
    steps_per_epoch = images.size(0) // batch_size
    if state["batch"] == 0:  # a fresh permutation per epoch; a resumed epoch keeps its own
        state["perm"] = torch.randperm(images.size(0), device=device)
    sums = torch.zeros(4, device=device)  # summed on the device: no host sync on steps that do not log
    steps, log_time, log_step = 0, time.perf_counter(), state["step"]
    while state["batch"] < steps_per_epoch and state["step"] < last_step and stop.signal is None:
        index = state["perm"][state["batch"] * batch_size:(state["batch"] + 1) * batch_size]
        real = to_unit_range(images[index])
        z = torch.randn(batch_size, args.latent_dim, device=device)
        stats = train_step(G, D, opt_G, opt_D, real, z, args.amp)
        sums += stats
        state["batch"], state["step"], steps = state["batch"] + 1, state["step"] + 1, steps + 1
        if state["step"] % args.log_every == 0:  # .tolist() waits for the device: only here
            now = time.perf_counter()
            rate = (state["step"] - log_step) * batch_size / (now - log_time)
            row = log_line(state["epoch"] + 1, args.epochs, state, steps_per_epoch, stats.tolist(), rate)
            append_metrics(run_dir / "metrics.csv", row)
            state["metrics"].append(row)
            check_finite(row)
            log_time, log_step = now, state["step"]
        if args.sample_every and state["step"] % args.sample_every == 0:
            save_grid(G_to_sample, state["fixed_noise"], run_dir / "samples" / f"step_{state['step']:07d}.png")
    return (sums / max(steps, 1)).tolist(), steps


def check_finite(values, *modules):
    """Stop on NaN or infinity before anything is saved: the last good checkpoint stays."""
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    for module in modules:
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            bad.append(f"{type(module).__name__} weights")
    if bad:
        raise GanError(f"training diverged: {', '.join(bad)} became NaN or infinite; stopped without saving, "
                       "the last checkpoint is intact (try a smaller --lr)")


def log_line(epoch, epochs, state, steps_per_epoch, stats, images_per_second):
    loss_d, loss_g, d_x, d_gz = stats
    print(f"[{epoch}/{epochs}][{state['batch']}/{steps_per_epoch}] step {state['step']}  "
          f"Loss_D {loss_d:.4f}  Loss_G {loss_g:.4f}  D(x) {d_x:.4f}  D(G(z)) {d_gz:.4f}  "
          f"{images_per_second:,.0f} img/s", flush=True)
    return {"epoch": epoch, "step": state["step"], "Loss_D": loss_d, "Loss_G": loss_g, "D(x)": d_x,
            "D(G(z))": d_gz, "images_per_s": images_per_second}


def print_epoch(epoch, epochs, means, seconds, steps, state, clock):
    elapsed = time.perf_counter() - clock["start"]
    eta = elapsed / max(state["step"] - clock["start_step"], 1) * (clock["last_step"] - state["step"])
    status = "done" if state["batch"] == 0 else "stopped early"
    print(f"epoch {epoch}/{epochs} {status}: mean Loss_D {means[0]:.4f}  Loss_G {means[1]:.4f}  "
          f"D(x) {means[2]:.4f}  D(G(z)) {means[3]:.4f}  {seconds:.1f}s ({steps} steps)  "
          f"ETA {datetime.timedelta(seconds=round(eta))}", flush=True)


def print_banner(args, device, run_dir, n_images, G, D):
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{name}  torch {torch.__version__}  amp {args.amp}  compile {args.compile}")
    if device.type == "cuda":
        print(f"CUDA {torch.version.cuda}  cuDNN {torch.backends.cudnn.version()}")
    where = "random images" if args.dataset == "fake" else args.data_dir
    print(f"dataset {args.dataset}: {n_images} training images ({where})")
    print(f"Generator {count_parameters(G):,} parameters, Discriminator {count_parameters(D):,} parameters")
    print(f"seed {args.seed}  batch {args.batch_size}  lr {args.lr}  betas ({args.beta1}, {args.beta2})")
    print(f"run folder {run_dir}", flush=True)


def report_device_check(G, device, state, clock, batch_size):
    """--dataset fake: the GPU sanity check passes only on the device asked for, with finite losses."""
    on = next(G.parameters()).device
    if on.type != device.type:
        raise GanError(f"device check failed: training ran on {on}, not {device}")
    rate = (state["step"] - clock["start_step"]) * batch_size / (time.perf_counter() - clock["start"])
    print(f"device check passed: trained on {on}, losses finite, {rate:,.0f} images/s overall")


# ----------------------------------------------------------------------------------------------
# Outputs: sample grids, metrics, the loss plot.
# ----------------------------------------------------------------------------------------------

@torch.inference_mode()  # no autograd bookkeeping while sampling
def sample(G, z):
    was_training = G.training
    G.eval()  # BatchNorm uses its running statistics: a sample does not depend on its batch mates
    images = G(z).float()
    G.train(was_training)
    return images


def save_grid(G, z, path, nrow=8):
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(sample(G, z), path, nrow=nrow, normalize=True, value_range=(-1, 1))


METRIC_FIELDS = ["epoch", "step", "Loss_D", "Loss_G", "D(x)", "D(G(z))", "images_per_s"]


def write_rows(path, fields, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def append_metrics(path, row):
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, METRIC_FIELDS).writerow(row)


def plot_losses(rows, quality, path):
    from matplotlib.figure import Figure  # the object API: no GUI backend, no global state

    panels = 3 if len(quality) > 1 else 2
    fig = Figure(figsize=(5 * panels, 4), layout="constrained")
    axes = fig.subplots(1, panels)
    steps = [r["step"] for r in rows]
    for key, ax in (("Loss_D", axes[0]), ("Loss_G", axes[0]), ("D(x)", axes[1]), ("D(G(z))", axes[1])):
        ax.plot(steps, [r[key] for r in rows], label=key)
    axes[0].set(title="losses", xlabel="step")
    axes[1].set(title="D's mean output (0.5 at equilibrium)", xlabel="step", ylim=(0, 1))
    if panels == 3:
        axes[2].plot([q["step"] for q in quality], [q["FID"] for q in quality], "o-", label="FID of samples")
        axes[2].axhline(quality[-1]["FID_real"], color="gray", linestyle="--", label="FID of real data")
        axes[2].set(title="FID (lower is better)", xlabel="step")
    for ax in axes:
        ax.legend()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic, self-describing, loaded with weights_only=True.
# ----------------------------------------------------------------------------------------------

def save_atomically(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or a second Ctrl-C: drop the half-written file
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise GanError(f"could not save {path}: {reason}; the previous {path.name} is intact") from e


def file_header(kind):
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind}


def header(kind, args):
    return {**file_header(kind), "model_args": model_args_from(args), "dataset": args.dataset}


def save_checkpoint(run_dir, args, state, G, D, opt_G, opt_D):
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    checkpoint = {**header("checkpoint", args), "args": vars(args),
                  "generator": G.state_dict(), "discriminator": D.state_dict(),
                  "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                  "epoch": state["epoch"], "batch": state["batch"], "step": state["step"],
                  "perm": state["perm"].cpu(), "fixed_noise": state["fixed_noise"].cpu(),
                  "rng": rng, "metrics": state["metrics"], "quality": state["quality"]}
    save_atomically(checkpoint, run_dir / "checkpoint.pt")
    save_atomically({**header("generator", args), "generator": G.state_dict()}, run_dir / "generator.pt")


def load_file(path, device):
    """Load one of our files safely: weights_only refuses pickles that would run code."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise GanError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met an object it will not build
        raise GanError(f"{path} is not a readable vanilla_gan checkpoint: it holds more than tensors and "
                       "plain data, and loading it could run code, so it was refused unread") from e
    except Exception as e:  # OSError, EOFError, KeyError, RuntimeError: truncated or not a torch file
        raise GanError(f"{path} is not a readable vanilla_gan checkpoint (truncated, or not a PyTorch "
                       f"file: {type(e).__name__})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GanError(f"{path} is not a vanilla_gan checkpoint")
    if data.get("version") != FORMAT_VERSION:
        raise GanError(f"{path} was written by an incompatible version of this script "
                       f"(format {data.get('version')}, this script reads {FORMAT_VERSION})")
    return path, data


def restore(state, G, D, opt_G, opt_D, args, device):
    """Put a loaded checkpoint back in place: weights, optimisers, RNG, position in the epoch."""
    G.load_state_dict(state["generator"])
    D.load_state_dict(state["discriminator"])
    opt_G.load_state_dict(state["opt_G"])
    opt_D.load_state_dict(state["opt_D"])
    for opt in (opt_G, opt_D):  # training flags given on the command line win over the saved ones
        for group in opt.param_groups:
            group["lr"], group["betas"] = args.lr, (args.beta1, args.beta2)
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
    state["perm"] = state["perm"].to(device)
    state["fixed_noise"] = state["fixed_noise"].to(device)


CHECKPOINT_KEYS = ("args", "generator", "discriminator", "opt_G", "opt_D", "epoch", "batch", "step", "perm",
                   "fixed_noise", "rng", "metrics", "quality")


def resolve_resume(args, typed):
    """Merge a checkpoint's saved flags with those typed now; refuse changes to the run's identity."""
    path, checkpoint = load_file(args.resume, "cpu")
    if checkpoint.get("kind") != "checkpoint":
        raise GanError(f"{path} holds only a generator; --resume needs the run's checkpoint.pt")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise GanError(f"{path} is incomplete (no {', '.join(missing)}); start a new run")
    saved = checkpoint["args"]
    changed = [name for name in RUN_IDENTITY if name in typed and typed[name] != saved.get(name)]
    if changed:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in changed)
        raise GanError(f"{flags} differ from the checkpoint's ({path}); a resumed run keeps its model, "
                       "data and batch order: drop them, or start a new run", code=2)
    run_dir = path.parent.resolve()
    if "out_dir" in typed and Path(typed["out_dir"]).resolve() != run_dir:
        raise GanError(f"--out-dir differs from the resumed run's folder {run_dir}; drop it", code=2)
    merged = {**vars(args), **saved, **typed, "out_dir": str(run_dir), "resume": str(path)}
    return argparse.Namespace(**merged), run_dir, checkpoint


def new_run_dir(out_dir):
    """A fresh run folder, checked writable before any training starts."""
    if out_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir, n = Path("runs") / stamp, 1
        while run_dir.exists():
            n += 1
            run_dir = Path("runs") / f"{stamp}-{n}"
    else:
        run_dir = Path(out_dir)
    run_dir = run_dir.resolve()
    if (run_dir / "checkpoint.pt").exists():
        raise GanError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                       "or choose another --out-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GanError(f"cannot write to the run folder {run_dir}: {e.strerror}; choose another --out-dir")
    return run_dir


# ----------------------------------------------------------------------------------------------
# Generating from a saved model.
# ----------------------------------------------------------------------------------------------

def generate(args):
    device = pick_device(args.device)
    path, data = load_file(args.checkpoint, device)
    try:
        G = build_generator(data["model_args"]).to(device)
        G.load_state_dict(data["generator"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise GanError(f"{path} does not hold a generator this script can rebuild ({type(e).__name__})") from e
    torch.manual_seed(args.seed)
    z = torch.randn(args.generate, data["model_args"]["latent_dim"], device=device)
    out = Path(args.out) if args.out else path.parent / "generated.png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".pt":
            save_atomically(sample(G, z).cpu(), out)
        else:
            save_grid(G, z, out, nrow=args.nrow)
    except (OSError, ValueError) as e:  # ValueError: PIL does not know the file extension
        raise GanError(f"cannot write {out}: {e}; use a .png (grid) or .pt (tensor) file name") from e
    print(f"wrote {args.generate} images to {out.resolve()}")
    if args.eval:
        dataset = data.get("dataset", "mnist")
        QualityJudge(dataset, args.data_dir, path.parent, device)(
            G, data["model_args"]["latent_dim"], None, None)
    return 0


# ----------------------------------------------------------------------------------------------
# How good is it? FID, Inception Score and class coverage, judged by a small classifier.
# ----------------------------------------------------------------------------------------------

EVAL_SAMPLES = 10_000  # generated samples per evaluation, against up to 10,000 test images
CLASSIFIER_VERSION = 1  # bump when Classifier or its training changes: cached ones are retrained


class Classifier(nn.Module):
    """A small CNN; its 128 penultimate features are the space FID is measured in (the role
    Inception-v3 plays for photographs)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(images, labels, device, epochs=3, batch_size=128):
    """About 30 s on a 2-core CPU for MNIST's 60,000 images, and about 99% test accuracy."""
    model = Classifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), fused=device.type in ("cuda", "cpu"))
    steps = epochs * math.ceil(len(images) / batch_size)
    # one-cycle: warm up to 3e-3, then anneal; reaches 99% in a few epochs where a fixed rate needs more
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    images, labels, amp = images.to(device), labels.to(device), amp_by_default(device)
    for _ in range(epochs):
        for index in torch.randperm(len(images), device=device).split(batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(to_unit_range(images[index])).float()
            loss = nn.functional.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def load_classifier(dataset, data_dir, run_dir, device, train_set, test_set):
    """The cached classifier for this dataset, or one trained now on train_set and cached."""
    folders = [Path(data_dir) / DATASETS[dataset], run_dir]  # beside the data if we may write there
    for path in (folder / "classifier.pt" for folder in folders):
        if not path.is_file():
            continue
        try:
            saved = load_file(path, device)[1]
            if saved.get("classifier_version") == CLASSIFIER_VERSION and saved.get("dataset") == dataset:
                model = Classifier().to(device)
                model.load_state_dict(saved["classifier"])
                print(f"classifier {path}: {saved['accuracy']:.2%} test accuracy")
                return model.eval()
        except (GanError, KeyError, RuntimeError):
            pass
        print(f"classifier {path} is stale or damaged: training a new one")
    start = time.perf_counter()
    model = train_classifier(*train_set, device)
    test_images, test_labels = test_set
    accuracy = (predict(model, test_images)[1].argmax(1).cpu() == test_labels).double().mean().item()
    print(f"trained a {dataset} classifier in {time.perf_counter() - start:.0f}s: {accuracy:.2%} test accuracy")
    saved = {**file_header("classifier"), "dataset": dataset, "classifier_version": CLASSIFIER_VERSION,
             "accuracy": accuracy, "classifier": model.state_dict()}
    for folder in folders:
        try:
            save_atomically(saved, folder / "classifier.pt")
            break
        except GanError:  # a read-only data folder: the run folder will do
            continue
    return model


@torch.inference_mode()
def predict(classifier, images, batch_size=250):
    """Penultimate features (float64) and class probabilities of uint8 or [-1, 1] images."""
    features, probs = [], []
    device = next(classifier.parameters()).device
    for batch in images.split(batch_size):  # small batches: the conv activations stay in cache
        batch = batch.to(device)
        x = to_unit_range(batch) if batch.dtype == torch.uint8 else batch
        f = classifier.features(x)
        features.append(f.double())
        probs.append(classifier.head(f).softmax(1).double())
    return torch.cat(features), torch.cat(probs)


def frechet_distance(features_a, features_b):
    """FID: fit a Gaussian to each set of features, then
    ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(features_a.T)), torch.atleast_2d(torch.cov(features_b.T))
    root_a = matrix_sqrt(cov_a)
    # Tr((C_a C_b)^(1/2)) = Tr((C_a^(1/2) C_b C_a^(1/2))^(1/2)), a symmetric matrix: eigvalsh is safe.
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def matrix_sqrt(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def inception_score(probs):
    """exp(E_x KL(p(y|x) || p(y))): high when each sample is clearly one class and all classes appear."""
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (probs.clamp(min=1e-12).log() - marginal.clamp(min=1e-12).log())).sum(1)
    return kl.mean().exp().item()


def class_shares(probs):
    return (torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)).tolist()


class QualityJudge:
    """Loaded once per run: the classifier, the test set's features and real data's reference scores."""

    def __init__(self, dataset, data_dir, run_dir, device, samples=EVAL_SAMPLES):
        self.samples = samples
        if dataset == "fake":
            raise GanError("no quality report exists for random data (--dataset fake): drop --eval", code=2)
        train_set = load_dataset(dataset, data_dir, train=True)
        test_set = load_dataset(dataset, data_dir, train=False)
        with torch.random.fork_rng():  # training the classifier must not shift the GAN's random numbers
            torch.manual_seed(0)
            self.classifier = load_classifier(dataset, data_dir, run_dir, device, train_set, test_set)
        self.test_features, _ = predict(self.classifier, test_set[0][:10_000])
        features, probs = predict(self.classifier, train_set[0][:10_000])
        self.reference = {"FID_real": frechet_distance(features, self.test_features),
                          "IS_real": inception_score(probs)}

    def __call__(self, G, latent_dim, epoch, step):
        z = torch.randn(self.samples, latent_dim, generator=torch.Generator().manual_seed(0))
        samples = torch.cat([sample(G, chunk.to(next(G.parameters()).device)) for chunk in z.split(1000)])
        features, probs = predict(self.classifier, samples)
        shares = class_shares(probs)
        row = {"epoch": epoch, "step": step, "FID": frechet_distance(features, self.test_features),
               "IS": inception_score(probs), **self.reference, "min_share": min(shares),
               **{f"share_{k}": share for k, share in enumerate(shares)}}
        where = "" if step is None else f" at step {step}"
        print(f"quality{where}: FID {row['FID']:.2f} (real data {row['FID_real']:.2f})  "
              f"IS {row['IS']:.2f} (real data {row['IS_real']:.2f})  "
              f"rarest class {shares.index(min(shares))} at {min(shares):.1%} of samples", flush=True)
        rare = [str(k) for k, share in enumerate(shares) if share < 0.05]
        if rare:
            many = len(rare) > 1
            print(f"warning: class{'es' * many} {', '.join(rare)} under 5% of samples: the generator is "
                  f"dropping {'them' if many else 'it'} (mode collapse)", flush=True)
        return row


QUALITY_FIELDS = ["epoch", "step", "FID", "IS", "FID_real", "IS_real", "min_share",
                  *[f"share_{k}" for k in range(10)]]


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def run(argv):
    args, typed = parse_args(argv)
    if args.generate is not None:
        return generate(args)
    state = None
    if args.resume:
        args, run_dir, state = resolve_resume(args, typed)
        print(f"resuming {run_dir} at step {state['step']} (epoch {state['epoch']} done)")
    device = pick_device(args.device)  # before a new run folder exists: a refusal leaves nothing behind
    if state is None:
        run_dir = new_run_dir(args.out_dir)
        args.out_dir = str(run_dir)
    args.data_dir = str(Path(args.data_dir).resolve())  # absolute: a resumed run may start elsewhere
    if args.amp is None:
        args.amp = amp_by_default(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for the float32 products
    try:
        code, state = train(args, run_dir, device, state)
    except BaseException:
        if not any(run_dir.iterdir()):  # stopped before anything was written: leave no empty folder
            run_dir.rmdir()
        raise
    # Drawn once the loop has returned and the dataset is freed: matplotlib's ~35 MB then never adds
    # to the training's peak memory.
    plot_losses(state["metrics"], state["quality"], run_dir / "losses.png")
    if code:
        resume = shlex.join([sys.executable, str(Path(__file__).resolve()), "--resume", str(run_dir)])
        print(f"stopped at step {state['step']}; checkpoint saved. To resume:\n  {resume}")
    else:
        print(f"done: {state['step']} steps. Outputs in {run_dir}")
    return code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv)
    except GanError as e:
        if "--debug" in argv:
            raise
        print(f"vanilla_gan.py: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # the second Ctrl-C: stop now, the last checkpoint stays as it was
        print("aborted; the last saved checkpoint is intact", file=sys.stderr)
        return 130
    except Exception as e:  # nothing we foresaw: still one line, the traceback on request
        if "--debug" in argv:
            raise
        print(f"vanilla_gan.py: error: {type(e).__name__}: {e} (run again with --debug to see where)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

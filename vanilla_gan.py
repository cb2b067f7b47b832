"""A vanilla GAN (Goodfellow et al., 2014) on MNIST, in one file.

Two fully connected networks play a game. The Generator G turns random noise z into images; the
Discriminator D looks at an image and says how likely it is to be real. D learns to tell real digits
from G's fakes, G learns to fool D. At the equilibrium G draws digits D cannot tell from real ones.
The GAN comes first, in plain torch. Below the marked line: the script around it (see --help).
"""
import argparse
import copy
import math
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)  # every image here is a (1, 28, 28) tensor with values in [-1, 1]
ACTIVATIONS = {"leakyrelu": lambda: nn.LeakyReLU(0.2), "relu": nn.ReLU}


def mlp(widths, activation, batchnorm=False, dropout=0.0):
    """Linear layers of the given widths; each hidden one followed by (BatchNorm,) the activation (, Dropout)."""
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

    def __init__(self, latent_dim=100, hidden=(256, 512, 1024), activation="leakyrelu", batchnorm=False):
        super().__init__()
        self.latent_dim = latent_dim
        # Tanh squashes the output into [-1, 1], the range of the rescaled data.
        self.net = nn.Sequential(*mlp([latent_dim, *hidden, 28 * 28], activation, batchnorm), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, *IMAGE_SHAPE)


class Discriminator(nn.Module):
    """Images (N, 1, 28, 28) -> one logit each, log(p / (1 - p)) for p = P(real): above 0 means 'real'."""

    def __init__(self, hidden=(512, 256), dropout=0.3):
        super().__init__()
        # LeakyReLU(0.2) keeps a gradient for negative inputs, so D never goes silent on G.
        # Dropout makes D a noisier, slower critic that cannot memorise the real digits, so G keeps
        # a useful gradient towards every digit (Goodfellow et al. trained D with it; G has none:
        # noise in G would only blur its images). No Sigmoid at the end: the loss applies it.
        self.net = nn.Sequential(nn.Flatten(), *mlp([28 * 28, *hidden, 1], "leakyrelu", dropout=dropout))

    def forward(self, images):
        return self.net(images)


def make_optimizer(net, lr=2e-4, betas=(0.5, 0.999)):
    # beta1 = 0.5 rather than 0.9: shorter momentum, so each network follows the other's recent moves
    # (Radford et al., 2015). fused: one kernel updates all the weights instead of one per tensor.
    fused = next(net.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(net.parameters(), lr=lr, betas=betas, fused=fused)


# Binary cross-entropy of a logit l with label y: -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))].
# Taking logits keeps it exact where a separate sigmoid would round to 0 or 1 and the log blow up.
bce = nn.BCEWithLogitsLoss()


def train_step(G, D, opt_G, opt_D, real, z, amp=False):
    """One D update and one G update. Returns the tensor [Loss_D, Loss_G, D(x), D(G(z))], left on
    the device: reading it would make the host wait for the device."""
    n = len(real)
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=amp):
        fake = G(z)  # one fake batch serves both updates
        # D maximises log D(x) + log(1 - D(G(z))). detach(): this update must not reach G.
        logits = D(torch.cat([real, fake.detach()]))  # one D pass over real and fake together
        real_logits, fake_logits = logits[:n].float(), logits[n:].float()
        loss_D = (bce(real_logits, torch.ones_like(real_logits))
                  + bce(fake_logits, torch.zeros_like(fake_logits)))
    opt_D.zero_grad()
    loss_D.backward()
    opt_D.step()

    # G maximises log D(G(z)), the non-saturating loss: minimising log(1 - D(G(z))) instead gives G
    # no gradient exactly when it is bad and D confident. D is frozen meanwhile, which only saves work:
    # no gradient for D's weights is computed, just the one that flows back through D into G.
    D.requires_grad_(False)
    try:
        with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=amp):
            fooled_logits = D(fake).float()  # the updated D judges the same fakes
            loss_G = bce(fooled_logits, torch.ones_like(fooled_logits))
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()
    finally:  # even if interrupted (a notebook's stop button), D must not stay frozen
        D.requires_grad_(True)

    # D(x) and D(G(z)) as probabilities: at the equilibrium both are 0.5.
    return torch.stack([loss_D, loss_G, torch.sigmoid(real_logits).mean(),
                        torch.sigmoid(fake_logits).mean()]).detach()


class EMA:
    """An exponential moving average of G's weights (Karras et al., 2018; Yazici et al., 2019). It takes
    no part in the game: it is what we sample from, steadier than the last step's G in the oscillating game."""

    def __init__(self, G, decay=0.999):
        self.G, self.decay, self.steps = copy.deepcopy(G).requires_grad_(False), decay, 0

    @torch.no_grad()
    def update(self, G):
        self.steps += 1
        # Warm-up: early on, average over roughly the steps so far. A fixed 0.999 would still hold 63%
        # of the random initial weights after an epoch (468 steps), and 37% after 1,000.
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        # w_avg <- w_avg + (1 - decay) (w - w_avg): one fused call over all the weights, no loop per tensor
        torch._foreach_lerp_(list(self.G.parameters()), list(G.parameters()), 1 - decay)
        for averaged, live in zip(self.G.buffers(), G.buffers()):  # BatchNorm's running statistics:
            averaged.copy_(live)  # copied, not averaged


def to_unit_range(pixels):
    """uint8 pixels (N, 28, 28) in 0..255 -> floats (N, 1, 28, 28) in [-1, 1], the range of G's Tanh."""
    return pixels.float().div_(127.5).sub_(1.0).unsqueeze(1)


def train_epoch(G, D, opt_G, opt_D, pixels, batch_size, order=None, amp=False, ema=None):
    """One pass over `pixels`, the whole training set as one uint8 tensor (N, 28, 28) on the training
    device, in batches of the image indices in `order` (default: a fresh random permutation),
    updating the EMA of G after each step if one is given. It yields each step's [Loss_D, Loss_G,
    D(x), D(G(z))]; the caller decides when to log, save or stop."""
    if order is None:
        order = torch.randperm(len(pixels), device=pixels.device)
    # Full batches only, so every step has one shape. A batch is an index slice of a tensor already on
    # the device, scaled as it is drawn: no DataLoader, no per-image transforms.
    for start in range(0, len(order) - batch_size + 1, batch_size):
        real = to_unit_range(pixels[order[start:start + batch_size]])
        z = torch.randn(batch_size, G.latent_dim, device=pixels.device)
        stats = train_step(G, D, opt_G, opt_D, real, z, amp)
        if ema is not None:
            ema.update(G)
        yield stats


@torch.no_grad()  # no autograd bookkeeping while sampling
def sample(G, z):
    """G in eval mode: BatchNorm uses its running statistics, so an image depends on its own z alone."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


# =================================================================================================
# Above: the GAN. Below: the script around it.
# =================================================================================================

class GanError(Exception):
    """A refusal we foresaw (missing data, a foreign checkpoint, divergence): one line, exit code 1."""


# ---- Data: a torchvision dataset as one uint8 tensor ----------------------------------------------
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "fake": None}


def load_dataset(name, data_dir, train=True):
    """(uint8 images (N, 28, 28), labels (N,)) of one split, read (or downloaded) by torchvision."""
    if name == "fake":  # random pixels, no labels, the same every run: the whole pipeline with no files
        return torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8, generator=torch.Generator()), None
    import torchvision  # imported here: generating from a checkpoint needs no dataset code
    dataset, root = getattr(torchvision.datasets, DATASETS[name]), Path(data_dir)
    try:
        data = dataset(root=str(root), train=train, download=True)
    except (OSError, RuntimeError) as e:  # OSError: the folder cannot be made; RuntimeError: every mirror failed
        raise GanError(f"{dataset.__name__} is not in {root / dataset.__name__ / 'raw'} and could not be downloaded "
                       f"({str(e).strip().splitlines()[-1]}); put its files there, or fix --data-dir") from e
    return data.data, data.targets


# ---- Checkpoints: the run, atomic saves, safe loads -----------------------------------------------
STATS = ("Loss_D", "Loss_G", "D(x)", "D(G(z))")  # what train_step returns, logged to metrics.csv
# Flags about one invocation or one machine, not about the run: checkpoints do not keep them.
PER_INVOCATION = {"config", "resume", "max_steps", "device", "amp", "eval", "out_dir", "generate", "checkpoint", "out"}
PROGRESS = ("epoch", "step", "order", "done", "fixed_noise", "metrics")  # Run fields saved as they are
NETWORKS = ("G", "D", "opt_G", "opt_D")  # Run fields saved as their state_dict()


@dataclass
class Run:
    """A training run: networks, optimisers and where training stands. checkpoint.pt holds all of it
    and the CPU's and CUDA's random number states, so a resumed run continues exactly there."""
    G: Generator
    D: Discriminator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    ema: EMA  # the averaged G, which grids, generator.pt and --eval sample from (G itself at decay 0)
    fixed_noise: torch.Tensor  # the noise of every sample grid, so grids compare across epochs
    epoch: int = 0  # epochs completed
    step: int = 0  # steps done in all (one D and one G update each)
    order: torch.Tensor = None  # the image order of the epoch under way; None between epochs
    done: int = 0  # images of `order` trained on so far
    metrics: list = field(default_factory=list)  # one row per logged step


def new_run(args, device):
    torch.manual_seed(args.seed)  # seeding, in one place: weights, grid noise, batch orders, z, dropout
    G = Generator(args.latent_dim, args.g_hidden, args.g_activation, args.g_batchnorm).to(device)
    D = Discriminator(args.d_hidden, args.d_dropout).to(device)
    opt_G, opt_D = make_optimizer(G, args.lr), make_optimizer(D, args.lr)
    return Run(G, D, opt_G, opt_D, EMA(G, args.ema_decay), torch.randn(64, args.latent_dim).to(device))


def restore(args, device, checkpoint):
    """The run a checkpoint holds, on `device`."""
    run = new_run(args, device)
    for name in NETWORKS:
        load_state(getattr(run, name), checkpoint[name])
    load_state(run.ema.G, checkpoint["G_avg"])
    run.ema.steps = checkpoint["step"]  # one EMA update per step
    for group in run.opt_G.param_groups + run.opt_D.param_groups:  # this machine's Adam kernel, a typed --lr
        group.update(lr=args.lr, fused=run.opt_G.defaults["fused"])
    for name in PROGRESS:
        value = checkpoint[name]
        setattr(run, name, value.to(device) if isinstance(value, torch.Tensor) else value)
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    return run


def load_state(module, state):
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError) as e:  # "size mismatch for net.0.weight": a flag typed now changed it
        raise GanError(f"the checkpoint's {type(module).__name__} does not fit the model flags given now; drop "
                       f"them ({str(e).strip().splitlines()[-1].strip()})") from e


def save_checkpoint(run, args, run_dir):
    """checkpoint.pt (to resume), generator.pt (to generate), and metrics.csv with them: it never holds
    steps the checkpoint lacks."""
    flags = {name: value for name, value in vars(args).items() if name not in PER_INVOCATION}
    rng = {"cpu": torch.get_rng_state()}
    if run.fixed_noise.is_cuda:  # the GPU's own generator draws the noise and dropout's masks there
        rng["cuda"] = torch.cuda.get_rng_state(run.fixed_noise.device)
    checkpoint = {"args": flags, "rng": rng, "G_avg": run.ema.G.state_dict(),
                  **{name: getattr(run, name).state_dict() for name in NETWORKS},
                  **{name: getattr(run, name) for name in PROGRESS}}
    write_atomically(run_dir / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))
    write_atomically(run_dir / "generator.pt", lambda tmp: torch.save(dict(args=flags, G_avg=checkpoint["G_avg"]), tmp))
    columns = ["epoch", "step", *STATS, "images_per_s"]
    lines = [columns] + [[str(row[column]) for column in columns] for row in run.metrics]
    write_atomically(run_dir / "metrics.csv", lambda tmp: tmp.write_text("\n".join(map(",".join, lines)) + "\n"))


def write_atomically(path, write):
    """write(tmp) a file beside `path`, then rename it over `path`: a failure leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path, generating=False):
    """(path, dict) of checkpoint.pt or generator.pt, named or in a run folder."""
    path = Path(path) / ("generator.pt" if generating else "checkpoint.pt") if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise GanError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        written_by_torch = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    try:  # weights_only=True: tensors and plain data only, so loading a file runs no code
        checkpoint = torch.load(path, map_location="cpu", weights_only=True) if written_by_torch else None
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise GanError(f"{path} is not a readable vanilla_gan checkpoint: damaged, or holding objects whose "
                       "loading could run code (refused unread)") from e
    keys = {"args", "G_avg"} if generating else {"args", "rng", "G_avg", *NETWORKS, *PROGRESS}
    if not isinstance(checkpoint, dict) or not keys <= checkpoint.keys():
        raise GanError(f"{path} is not a vanilla_gan checkpoint")
    return path, checkpoint


def make_run_folder(args, resumed=None):
    """The run folder, created if need be; refused if it holds a run other than the resumed one."""
    run_dir = Path(args.out_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if (run_dir / "checkpoint.pt").exists() and run_dir.resolve() != (resumed and resumed.parent.resolve()):
        raise GanError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another "
                       "--out-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GanError(f"cannot create the run folder {run_dir} ({e.strerror}); choose another --out-dir") from e
    return run_dir


# ---- Outputs: sample grids, metrics.csv, the loss plot, the GIF -----------------------------------
def save_grid(images, path):
    from torchvision.utils import save_image
    path.parent.mkdir(parents=True, exist_ok=True)  # a square grid, 8 x 8 for the 64 of fixed_noise
    save_image(images, path, nrow=math.ceil(len(images) ** 0.5), normalize=True, value_range=(-1, 1))


def plot_losses(rows, steps_per_epoch, path):
    """The game at a glance: the losses and D's outputs by epoch, the equilibrium dashed."""
    from matplotlib.figure import Figure  # the object API: no GUI backend, no global state
    fig = Figure(figsize=(10, 4), layout="constrained")
    panels = ((STATS[:2], 2 * math.log(2), "losses (D guessing: Loss_D = 2 ln 2, dashed; Loss_G = ln 2)"),
              (STATS[2:], 0.5, "D's mean output (0.5: D can only guess)"))
    for ax, (keys, equilibrium, title) in zip(fig.subplots(1, 2), panels):
        for key in keys:
            ax.plot([row["step"] / steps_per_epoch for row in rows], [row[key] for row in rows], ".-", label=key)
        ax.axhline(equilibrium, color="gray", linestyle="--", label=f"equilibrium ({equilibrium:.2f})")
        ax.set(title=title, xlabel="epoch")
        ax.legend()
    fig.savefig(path, dpi=100)


def save_progress_gif(samples_dir):
    """Every epoch's grid as one animation: 0.2 s a frame, the last held for 2 s."""
    from PIL import Image
    frames = [Image.open(path).copy() for path in sorted(samples_dir.glob("epoch_*.png"))]  # copy: file closed
    if frames:
        write_atomically(samples_dir / "progress.gif", lambda tmp: frames[0].save(tmp, format="GIF", save_all=True,
                         append_images=frames[1:], loop=0, duration=[200] * (len(frames) - 1) + [2000]))


# ---- The quality report: FID in a small classifier's features, and the rarest digit ---------------
def train_classifier(images, labels, device, epochs=3, batch_size=128):
    """The judge, a small seeded CNN (99% on MNIST): FID is measured in its last 128 features, as Inception's."""
    with torch.random.fork_rng(devices=[]):  # the GAN's random numbers stay untouched
        torch.default_generator.manual_seed(0)  # the CPU's alone: the judge is drawn there, and fork_rng restores it
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
        images, labels, optimizer = images.to(device), labels.to(device), torch.optim.Adam(model.parameters())
        # one-cycle: warm up to 3e-3, then anneal: 99% in three epochs, where a fixed rate needs more
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, epochs * math.ceil(len(images) / batch_size))
        for _ in range(epochs):
            for index in torch.randperm(len(images)).split(batch_size):
                loss = nn.functional.cross_entropy(model(to_unit_range(images[index])), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


@torch.no_grad()
def judge(classifier, images):
    """The classifier's features (float64) and predicted classes of images in [-1, 1], 500 at a time."""
    features = torch.cat([classifier[:-1](batch.to(classifier[0].weight.device)) for batch in images.split(500)])
    return features.double(), classifier[-1](features).argmax(1).cpu()


def frechet_distance(features_a, features_b):
    """FID: fit a Gaussian to each set of features; ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(features_a.T)), torch.atleast_2d(torch.cov(features_b.T))
    # Tr((C_a C_b)^(1/2)) is the sum of the square roots of C_a C_b's eigenvalues, real and >= 0 in
    # exact arithmetic; .real drops the tiny imaginary parts that rounding leaves.
    cross = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def report_quality(images, dataset, data_dir, device):
    """Print and return the FID of images in [-1, 1] against the test set, and each class's share."""
    train_set, test_set = load_dataset(dataset, data_dir), load_dataset(dataset, data_dir, train=False)
    print("training the judge, a small classifier (seconds on a GPU, a minute on a CPU)", flush=True)
    classifier = train_classifier(*train_set, device)
    test_features = judge(classifier, to_unit_range(test_set[0]))[0]
    real_fid = frechet_distance(judge(classifier, to_unit_range(train_set[0][:10_000]))[0], test_features)
    features, classes = judge(classifier, images)
    fid, shares = frechet_distance(features, test_features), torch.bincount(classes, minlength=10) / len(images)
    print(f"quality of {len(images)} samples: FID {fid:.2f} (10,000 real images: {real_fid:.2f}), rarest class "
          f"{shares.argmin().item()} at {shares.min().item():.1%}", flush=True)
    return fid, shares


# ---- The command line -----------------------------------------------------------------------------
# Classic setups, one flag away: --config NAME makes these the defaults; flags typed beside it win.
CONFIGS = {
    "classic": dict(g_hidden=[256, 512], d_hidden=[512, 256], d_dropout=0.0, batch_size=128, epochs=50),
    "minimal": dict(g_hidden=[128], g_activation="relu", d_hidden=[128], d_dropout=0.0, batch_size=64, epochs=100),
    "deep": dict(g_hidden=[256, 512, 1024], g_activation="relu", d_hidden=[1024, 512, 256], d_dropout=0.0, epochs=20),
    "batchnorm": dict(g_hidden=[128, 256, 512, 1024], g_activation="relu", g_batchnorm=True, d_hidden=[1024, 512, 256],
                      d_dropout=0.0, latent_dim=64, lr=1e-5, epochs=500),
}


def checked(cast, is_valid, name):
    """An argparse type: `cast` the text, refuse it if not `is_valid` (a ValueError either way)."""
    def parse(text):
        if not is_valid(value := cast(text)):
            raise ValueError(text)
        return value
    parse.__name__ = name  # argparse's "invalid <name> value"
    return parse


positive_int = checked(int, lambda v: v > 0, "positive integer")
positive_float = checked(float, lambda v: 0 < v < math.inf, "positive number")  # refuses nan too
fraction = checked(float, lambda v: 0 <= v < 1, "fraction in [0, 1)")
device_name = checked(str, lambda v: v in ("auto", "cpu", "mps", "cuda") or v.startswith("cuda:") and v[5:].isdigit(),
                      "device")
picture_or_tensor = checked(Path, lambda v: v.suffix.lower() in (".png", ".jpg", ".pt"), ".png, .jpg or .pt file")


def build_parser():
    p = argparse.ArgumentParser("vanilla_gan.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, help="a classic setup (CONFIGS); flags typed beside it win")
    p.add_argument("--epochs", type=positive_int, default=50, help="passes over the training set")
    p.add_argument("--max-steps", type=positive_int, help="stop this invocation at this many steps in all")
    p.add_argument("--device", type=device_name, default="auto", help="auto: cuda, else mps, else cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (pays off on CPUs with bf16 instructions)")
    p.add_argument("--seed", type=int, default=42, help="seeds weights, noise, batch order and dropout")
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="fake: random pixels, no files")
    p.add_argument("--data-dir", default="data", help="the folder holding MNIST/raw/ (or the dataset's own folder)")
    p.add_argument("--latent-dim", type=positive_int, default=100, help="size of the noise vector z")
    p.add_argument("--g-hidden", type=positive_int, nargs="+", default=[256, 512, 1024], help="G's hidden widths")
    p.add_argument("--g-activation", choices=ACTIVATIONS, default="leakyrelu", help="G's hidden activation")
    p.add_argument("--g-batchnorm", action="store_true", help="BatchNorm1d after each hidden layer of G")
    p.add_argument("--d-hidden", type=positive_int, nargs="+", default=[512, 256], help="D's hidden widths")
    p.add_argument("--d-dropout", type=fraction, default=0.3, help="Dropout after each hidden layer of D")
    p.add_argument("--ema-decay", type=fraction, default=0.999, help="sample from G's average (0: G itself)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="real images per step")
    p.add_argument("--lr", type=positive_float, default=2e-4, help="Adam's learning rate, both networks")
    p.add_argument("--out-dir", help="the run folder; if not given, a new runs/<date-time>")
    p.add_argument("--log-every", type=positive_int, default=100, help="print and record every N steps")
    p.add_argument("--eval", action="store_true", help="FID and class shares after training, or of --generate's")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (or its checkpoint.pt)")
    p.add_argument("--generate", type=positive_int, metavar="N", help="only generate N images from --checkpoint")
    p.add_argument("--checkpoint", metavar="RUN", help="a run folder, or its generator.pt or checkpoint.pt")
    p.add_argument("--out", type=picture_or_tensor, help="a .png/.jpg grid or .pt tensor (default: generated.png)")
    return p


def parse_args(argv=None):
    """Each flag from the first that sets it: typed, --config, the run resumed or generated from, defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generate and not args.checkpoint:
        parser.error("--generate needs --checkpoint (a run folder, generator.pt or checkpoint.pt)")
    loaded = None
    if args.resume or args.generate:
        loaded = load_checkpoint(args.checkpoint if args.generate else args.resume, generating=bool(args.generate))
        parser.set_defaults(**loaded[1]["args"], out_dir=str(loaded[0].parent))  # the run's folder, wherever it is now
    parser.set_defaults(**CONFIGS.get(args.config, {}))
    args = parser.parse_args(argv)
    if args.eval and args.dataset == "fake":
        parser.error("no quality report exists for random images (--dataset fake): drop --eval")
    return args, loaded


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
            or device.type == "mps" and not torch.backends.mps.is_available()):
        raise GanError(f"--device {name}: no such device here (try --device cpu)")
    return device


# ---- The device check (--dataset fake on a GPU): does the GPU compute what the CPU computes? -------
# Float32 sums taken in another order differ by about 1e-7 relative; 20 steps of the game, and Adam's
# normalised updates where a gradient is near 0, grow that to about 1e-5. A wrong kernel errs by ~1.
DEVICE_TOLERANCE = 1e-3


def device_check(args, device, steps=20):
    """The same steps from the same weights and inputs on `device` and on the CPU, in plain float32 (no TF32,
    no autocast, no dropout): their losses and weights must agree to DEVICE_TOLERANCE."""
    with torch.random.fork_rng(devices=[]):  # the run's own random numbers stay untouched
        run = new_run(args, torch.device("cpu"))  # the run's own networks, as they start
        real = torch.rand(steps, args.batch_size, *IMAGE_SHAPE) * 2 - 1
        z = torch.randn(steps, args.batch_size, args.latent_dim)
    precision, results = torch.get_float32_matmul_precision(), []
    torch.set_float32_matmul_precision("highest")
    for where in (device, torch.device("cpu")):  # the CPU last: its time is the one printed
        G, D = copy.deepcopy(run.G).to(where), copy.deepcopy(run.D).to(where).eval()  # eval(): no dropout
        opt_G, opt_D, start = make_optimizer(G), make_optimizer(D), time.perf_counter()
        stats = [train_step(G, D, opt_G, opt_D, x.to(where), noise.to(where)) for x, noise in zip(real, z)]
        losses = torch.stack(stats).double().cpu()  # .cpu() waits for the device: the timing is complete
        seconds = time.perf_counter() - start
        results.append([losses, *(value.double().cpu() for net in (G, D) for value in net.state_dict().values())])
    torch.set_float32_matmul_precision(precision)
    # the largest relative difference, tensor by tensor: a small tensor's error is not lost among big ones
    worst = max(((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(*results))
    if not worst <= DEVICE_TOLERANCE:  # NaN fails too
        raise GanError(f"device check failed: losses or weights on {device} differ from the CPU's by {worst:.1e} "
                       f"(relative; tolerance {DEVICE_TOLERANCE:g}): this device, driver or PyTorch build errs")
    print(f"device check passed: {device} matches the CPU to {worst:.0e} over {steps} steps (the CPU ran "
          f"{steps * args.batch_size / seconds:,.0f} img/s)", flush=True)


# ---- Training and generating ----------------------------------------------------------------------
DIVERGED = 100.0  # a BCE loss this large means logits beyond +-100: D's sigmoid is saturated for good


class StopRequest:
    """Ctrl-C or SIGTERM: finish the step, save, exit. A second Ctrl-C stops at once."""
    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving (Ctrl-C again: abort)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(args, loaded):
    """Train to --epochs or --max-steps, or until a stop request. Returns the exit code."""
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for the float32 products
    if args.dataset == "fake" and device.type != "cpu":  # first: before the run draws its random numbers
        device_check(args, device)
    args.data_dir = str(Path(args.data_dir).resolve())  # absolute: a resumed run may start elsewhere
    pixels = load_dataset(args.dataset, args.data_dir)[0].to(device)  # resident: see train_epoch
    if args.batch_size > len(pixels):
        raise GanError(f"--batch-size {args.batch_size} is larger than the dataset ({len(pixels)} images)")
    run_dir = make_run_folder(args, loaded and loaded[0])
    run = restore(args, device, loaded[1]) if loaded else new_run(args, device)
    steps_per_epoch = len(pixels) // args.batch_size
    last_step = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    source = "random pixels" if args.dataset == "fake" else args.data_dir
    sizes = [f"{sum(p.numel() for p in net.parameters()):,}" for net in (run.G, run.D)]
    print(f"device {device}{gpu}  torch {torch.__version__}  amp {args.amp}\n"
          f"dataset {args.dataset}: {len(pixels)} training images ({source})\n"
          f"Generator {sizes[0]} parameters, Discriminator {sizes[1]} parameters\n"
          f"run folder {run_dir}" + (f", resuming at step {run.step}" if run.step else ""), flush=True)
    clock = (time.perf_counter(), run.step)
    with StopRequest() as stop:
        while run.step < last_step and stop.signal is None:
            if run.order is None:  # a fresh image order each epoch; a resumed epoch keeps its own
                run.order = torch.randperm(len(pixels), device=device)
            sums, first_step, epoch_start = torch.zeros(4, device=device), run.step, time.perf_counter()
            for stats in train_epoch(run.G, run.D, run.opt_G, run.opt_D, pixels, args.batch_size,
                                     run.order[run.done:], args.amp, run.ema):
                sums += stats  # summed on the device: no host sync on steps that do not log
                run.step, run.done = run.step + 1, run.done + args.batch_size
                stopping = run.step >= last_step or stop.signal is not None
                if stopping or run.step % args.log_every == 0:  # .tolist() waits for the device: only here
                    clock = log_step(run, args, steps_per_epoch, stats.tolist(), clock)
                if stopping:
                    break
            means = (sums / max(1, run.step - first_step)).tolist()  # one host sync per epoch
            check_sane(means, run)  # before a save could overwrite good files
            completed = len(run.order) - run.done < args.batch_size
            print(f"epoch {run.epoch + 1}/{args.epochs} {'done' if completed else 'stopped'}: mean "
                  f"{format_stats(means)}  {time.perf_counter() - epoch_start:.1f}s", flush=True)
            if completed:
                run.epoch, run.order, run.done = run.epoch + 1, None, 0
            grid_name = f"epoch_{run.epoch:03d}.png" if completed else f"step_{run.step:07d}.png"
            save_grid(sample(run.ema.G, run.fixed_noise), run_dir / "samples" / grid_name)
            save_checkpoint(run, args, run_dir)
    del pixels  # on a CPU, freed before matplotlib loads, which reuses that memory: no higher peak
    plot_losses(run.metrics, steps_per_epoch, run_dir / "losses.png")
    save_progress_gif(run_dir / "samples")
    if stop.signal:
        print(f"stopped at step {run.step}; checkpoint saved. To resume: python vanilla_gan.py --resume {run_dir}")
        return 128 + stop.signal  # 130 for SIGINT, 143 for SIGTERM
    if args.eval:  # 10,000 samples from noise of their own, the same in every report
        z = torch.randn(10_000, args.latent_dim, generator=torch.Generator().manual_seed(0))
        report_quality(sample(run.ema.G, z.to(device)), args.dataset, args.data_dir, device)
    print(f"done: {run.step} steps. Outputs in {run_dir}")
    return 0


def log_step(run, args, steps_per_epoch, stats, clock):
    """The monitoring line and its metrics.csv row. Returns this log's clock: (time, step)."""
    now = time.perf_counter()
    rate = (run.step - clock[1]) * args.batch_size / (now - clock[0])
    check_sane(stats, run)
    run.metrics.append({"epoch": run.epoch + 1, "step": run.step, **dict(zip(STATS, stats)),
                        "images_per_s": round(rate)})
    print(f"[{run.epoch + 1}/{args.epochs}][{run.done // args.batch_size}/{steps_per_epoch}] step {run.step}  "
          f"{format_stats(stats)}  {rate:,.0f} img/s", flush=True)
    return now, run.step


def format_stats(stats):
    return "  ".join(f"{name} {value:.4f}" for name, value in zip(STATS, stats))


def check_sane(stats, run):
    """Stop a diverged run before it saves anything: the last good checkpoint stays as it was."""
    bad = [f"{name} {value:.3g}" for name, value in zip(STATS[:2], stats) if not abs(value) < DIVERGED]  # NaN too
    if bad or not torch.stack([p.isfinite().all() for p in [*run.G.parameters(), *run.D.parameters()]]).all():
        raise GanError(f"training diverged at step {run.step} ({', '.join(bad) or 'weights not finite'}; a loss "
                       f"above {DIVERGED:g}, NaN or infinite): stopped before saving it (try a smaller --lr)")


def generate(args, loaded):
    """--generate N: N images from the checkpoint's averaged generator, as a grid or a tensor."""
    device = pick_device(args.device)
    G = Generator(args.latent_dim, args.g_hidden, args.g_activation, args.g_batchnorm).to(device)
    load_state(G, loaded[1]["G_avg"])  # the averaged weights
    z = torch.randn(args.generate, G.latent_dim, generator=torch.Generator().manual_seed(args.seed))  # any device
    images = sample(G, z.to(device)).cpu()
    out = args.out or loaded[0].parent / "generated.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".pt":
        write_atomically(out, lambda tmp: torch.save(images, tmp))
    else:
        save_grid(images, out)
    print(f"wrote {len(images)} images to {out}")
    if args.eval:
        report_quality(images, args.dataset, args.data_dir, device)
    return 0


def main(argv=None):
    """The command line. From Python, main(["--epochs", "1"]) runs it and returns the exit code."""
    try:
        args, loaded = parse_args(None if argv is None else [str(arg) for arg in argv])
        return generate(args, loaded) if args.generate else train(args, loaded)
    except SystemExit as e:  # argparse's --help and errors: a return value, so a notebook survives them
        return e.code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("aborted; files already saved are intact", file=sys.stderr)
        return 130
    except GanError as e:
        print(f"vanilla_gan.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

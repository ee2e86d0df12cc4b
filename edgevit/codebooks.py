"""Weight sharing through codebooks: k-means scalar quantization and product quantization.

- k-means (Deep Compression, Han et al.): each layer's weights (or each group of its output
  channels) are clustered into 2^B shared values with linear initialisation (evenly spaced
  between the smallest and largest weight, which the paper found best); a weight is stored as
  its B-bit code.
- product quantization ("And the bit goes down", Stock et al.): each output channel's weights are
  cut into sub-vectors of D consecutive input weights, and each sub-vector is replaced by the
  nearest of K centroids of one per-layer codebook [K, D]; a sub-vector is stored as a one-byte
  code (K <= 256).

Both are fitted with scikit-learn's k-means. The activation-aware objective weights each weight
(k-means) or sub-vector (PQ) by the mean square of the calibration activations it multiplies:
an error on a weight that sees large inputs costs more output error. Fine-tuning trains the
centroids with the codes fixed: the decoded weight is `codebook[codes]`, so autograd sums the
gradients of a centroid's members, as the papers do.

A codebook layer computes exactly with its decoded weight: the checkpoint stores decoded fp32
weights (the PyTorch reference a compiled artifact is validated against) beside the codes and
codebooks, which `compile` carries into the artifact compressed (backend/codebook_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

CODEBOOK_SCHEMES = ("kmeans", "pq")
KMEANS_BITS = (2, 8)           # --bits range
PQ_SUBVECTOR = (4, 16)         # --subvector range
PQ_MAX_CENTROIDS = 256         # one-byte codes
KMEANS_MAX_ITER = 100
PQ_MAX_ITER = 50
SUBVECTORS_PER_CENTROID = 4    # pq: a layer gets at most (its sub-vectors / 4) centroids
OUTPUT_MULTIPLE = 4            # output channels a codebook layer's kernel tiles evenly (else the layer stays fp32)


def storage_bits(bits: int) -> int:
    """Bits one k-means code occupies in the artifact: 2 (four per byte), 4 (two per byte) or 8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


@dataclass(frozen=True)
class LayerCodebook:
    """One layer's codes and codebook.

    kmeans: codes [N, K] uint8 (K: the weight's inputs, a patch conv's flattened), codebook
            [G, C] float32, group g holding output channels g*N/G .. (g+1)*N/G - 1;
    pq:     codes [N, K / D] uint8, codebook [C, D] float32."""

    scheme: str
    codes: torch.Tensor
    codebook: torch.Tensor
    shape: tuple[int, ...]          # the layer's weight shape

    @property
    def subvector(self) -> int:
        return int(self.codebook.shape[1]) if self.scheme == "pq" else 1

    @property
    def centroids(self) -> int:
        return int(self.codebook.shape[0] if self.scheme == "pq" else self.codebook.shape[1])

    @property
    def bits(self) -> int:
        """Bits of information per code (log2 of the centroids, rounded up)."""
        return max(1, int(np.ceil(np.log2(self.centroids))))

    def decode(self, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """The weight the codes stand for, in the layer's shape (differentiable in `codebook`)."""
        cb = self.codebook if codebook is None else codebook
        codes = self.codes.long()
        if self.scheme == "pq":
            w = cb[codes]                                                        # (N, K/D, D)
        else:
            groups = cb.shape[0]
            n = codes.shape[0]
            group_of_row = torch.arange(n) // (n // groups)                      # (N,)
            w = cb[group_of_row[:, None], codes]                                 # (N, K)
        return w.reshape(self.shape)

    def artifact_bytes(self) -> int:
        """Bytes the compiled artifact stores for this layer: packed codes plus the codebook."""
        n, k = self.shape[0], int(np.prod(self.shape[1:]))
        if self.scheme == "pq":
            code_bytes = n * (k // self.subvector)
        else:
            per_byte = 8 // storage_bits(self.bits)
            code_bytes = k * -(-n // per_byte)
        return code_bytes + self.codebook.numel() * 4

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "codes": self.codes, "codebook": self.codebook, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerCodebook":
        return cls(d["scheme"], d["codes"], d["codebook"], tuple(int(s) for s in d["shape"]))


def record_problem(name: str, d: dict) -> str | None:
    """What is wrong with one layer's codebook record (None: nothing)."""
    codes, cb, shape = d.get("codes"), d.get("codebook"), d.get("shape")
    if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8 and codes.ndim == 2
            and isinstance(cb, torch.Tensor) and cb.dtype == torch.float32 and cb.ndim == 2
            and isinstance(shape, list) and len(shape) >= 2):
        return f"layer '{name}': uint8 codes [N, K'], a float32 codebook and the weight's shape expected"
    n, k = shape[0], int(np.prod(shape[1:]))
    if codes.numel() == 0 or cb.numel() == 0 or n <= 0 or k <= 0:
        return f"layer '{name}': empty codes or codebook"
    if d.get("scheme") == "pq":
        ok = codes.shape == (n, k // cb.shape[1]) and k % cb.shape[1] == 0 and cb.shape[0] <= PQ_MAX_CENTROIDS
    else:
        ok = codes.shape == (n, k) and n % cb.shape[0] == 0 and cb.shape[1] <= 256
    if not ok or int(codes.max()) >= (cb.shape[0] if d.get("scheme") == "pq" else cb.shape[1]):
        return f"layer '{name}': codes and codebook do not fit the weight shape {shape}"
    return None


# ---------------------------------------------------------------------------- fitting


def codebook_layers(layers: dict[str, nn.Module], scheme: str, subvector: int, groups: int = 1
                    ) -> tuple[dict, dict[str, str]]:
    """(the layers a codebook can encode, {layer: why it stays fp32} for the rest): the kernel tiles
    output channels by OUTPUT_MULTIPLE, PQ cuts inputs into whole sub-vectors, k-means groups
    split the outputs evenly."""
    keep, skipped = {}, {}
    for name, layer in layers.items():
        n, k = layer.weight.shape[0], layer.weight[0].numel()
        if n % OUTPUT_MULTIPLE:
            skipped[name] = f"{n} outputs, not a multiple of {OUTPUT_MULTIPLE}"
        elif scheme == "kmeans" and n % groups:
            skipped[name] = f"{n} outputs do not split into {groups} groups"
        elif scheme == "pq" and k < 2 * subvector:
            skipped[name] = f"{k} inputs: one sub-vector per output would cluster whole rows"
        elif scheme == "pq" and k % subvector:
            skipped[name] = f"{k} inputs, not a multiple of the sub-vector {subvector}"
        else:
            keep[name] = layer
    return keep, skipped


def fit_kmeans(weight: torch.Tensor, bits: int, groups: int = 1, importance: torch.Tensor | None = None,
               seed: int = 0) -> LayerCodebook:
    """2^bits shared values per group of output channels, linearly initialised; `importance` [K]
    (mean square input per input column) weights each weight's error."""
    from sklearn.cluster import KMeans

    w = weight.detach().reshape(weight.shape[0], -1).double().numpy()                  # (N, K)
    n, k = w.shape
    if n % groups:
        raise ValueError(f"{n} output channels do not split into {groups} groups")
    size = n // groups
    codes = np.zeros((n, k), np.uint8)
    codebook = np.zeros((groups, 1 << bits), np.float32)
    sample_weight = None if importance is None else np.broadcast_to(importance.double().numpy(), (size, k)).reshape(-1)
    for g in range(groups):
        values = w[g * size:(g + 1) * size].reshape(-1, 1)                               # (size*K, 1)
        clusters = min(1 << bits, len(np.unique(values)))
        init = np.linspace(values.min(), values.max(), clusters)[:, None]
        km = KMeans(clusters, init=init, n_init=1, max_iter=KMEANS_MAX_ITER, random_state=seed)
        labels = km.fit_predict(values, sample_weight=sample_weight)
        codes[g * size:(g + 1) * size] = labels.reshape(size, k)
        codebook[g, :clusters] = km.cluster_centers_[:, 0]
    return LayerCodebook("kmeans", torch.from_numpy(codes), torch.from_numpy(codebook), tuple(weight.shape))


def fit_pq(weight: torch.Tensor, subvector: int, centroids: int, importance: torch.Tensor | None = None,
           seed: int = 0) -> LayerCodebook:
    """One codebook of (at most) `centroids` sub-vectors of `subvector` inputs per layer (k-means++ init);
    `importance` [K] weights each sub-vector by the mean square input over its columns."""
    from sklearn.cluster import KMeans

    w = weight.detach().reshape(weight.shape[0], -1).double().numpy()                  # (N, K)
    n, k = w.shape
    subs = w.reshape(n, k // subvector, subvector)                                     # (N, K/D, D)
    rows = subs.reshape(-1, subvector)                                                  # (N*K/D, D)
    # a codebook as big as the layer's codes would not compress it: at most a quarter as many
    # centroids as the layer has sub-vectors (small layers, e.g. a 32 x 32 projection's 128)
    clusters = min(centroids, max(2, len(rows) // SUBVECTORS_PER_CENTROID), len(np.unique(rows, axis=0)))
    sample_weight = None
    if importance is not None:
        per_sub = importance.double().numpy().reshape(k // subvector, subvector).mean(axis=1)    # (K/D,)
        sample_weight = np.broadcast_to(per_sub, (n, k // subvector)).reshape(-1)
    km = KMeans(clusters, init="k-means++", n_init=1, max_iter=PQ_MAX_ITER, random_state=seed)
    labels = km.fit_predict(rows, sample_weight=sample_weight)
    codebook = km.cluster_centers_.astype(np.float32)                                   # (clusters, D)
    codes = labels.reshape(n, k // subvector).astype(np.uint8)
    return LayerCodebook("pq", torch.from_numpy(codes), torch.from_numpy(codebook), tuple(weight.shape))


def reconstruction_sqnr(weight: torch.Tensor, layer: LayerCodebook) -> float:
    """Signal-to-quantization-noise ratio of the decoded weight, dB (inf when exact)."""
    signal = float(weight.detach().double().pow(2).sum())
    noise = float((weight.detach().double() - layer.decode().double()).pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))


# ---------------------------------------------------------------------------- fine-tuning


class _Decoded(nn.Module):
    """A parametrization: the layer's weight is its codebook's decode (codes fixed, centroids trained)."""

    def __init__(self, layer: LayerCodebook):
        super().__init__()
        self.layer = layer
        self.codebook = nn.Parameter(layer.codebook.clone())

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.layer.decode(self.codebook)


def finetune_codebooks(model: nn.Module, codebooks: dict[str, LayerCodebook], images, steps: int, lr: float,
                       bar=None) -> dict[str, LayerCodebook]:
    """Train only the centroids (codes fixed) with cross-entropy for `steps` batches drawn from
    `images` (an iterator of (x, y)); returns the layers with their trained codebooks."""
    import torch.nn.functional as F
    from torch.nn.utils import parametrize

    modules = dict(model.named_modules())
    params = {}
    for name, layer in codebooks.items():
        parametrize.register_parametrization(modules[name], "weight", _Decoded(layer), unsafe=True)
        params[name] = modules[name].parametrizations.weight[0].codebook
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    model.train()
    try:
        for _ in range(steps):
            x, y = next(images)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(len(x))
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        model.eval()
        for name in codebooks:
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)
        for p in model.parameters():
            p.requires_grad_(True)
    return {name: LayerCodebook(layer.scheme, layer.codes, params[name].detach().clone().float(), layer.shape)
            for name, layer in codebooks.items()}

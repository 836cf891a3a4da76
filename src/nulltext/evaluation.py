"""``nulltext eval``: invert (and edit) every sample of a manifest with one or more methods and
tabulate reconstruction and background-preservation metrics.

Manifests:
- CSV or JSONL with ``image`` and ``prompt`` (``caption`` also accepted), optional ``id``,
  ``target`` (several separated by ``|``), ``blend`` ("src_word tgt_word") and ``mask`` (PIE-Bench
  run-length encoding as a JSON list);
- PIE-Bench's ``mapping_file.json`` (Ju et al. 2024): ``{id: {image_path, original_prompt,
  editing_prompt, blended_word, mask, ...}}``; the brackets PIE-Bench puts around edited words are
  removed, images are looked up under ``annotation_images/`` beside the file (or ``--images-root``).

Results are appended to ``OUTDIR/results.jsonl`` one line per (sample, method) as soon as they
exist (flushed and synced), so a crash loses at most the sample in flight and a rerun skips every
recorded pair. ``results.csv`` and ``summary.md`` are rewritten from it at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import EditConfig, InversionConfig
from .errors import NulltextError, one_line
from .files import atomic_write

METRICS = ("recon_psnr", "recon_ssim", "recon_mse", "recon_lpips", "bg_psnr", "bg_ssim", "bg_mse", "bg_lpips",
           "clip_score", "structure_distance", "invert_s", "edit_s", "peak_mb")
LPIPS_NETS = ("alex", "vgg", "squeeze")


class ModelMetrics:
    """Metrics that need model weights, loaded with ``from_pretrained`` from a hub id or a local
    folder when the user names them (nothing is downloaded otherwise):

    - CLIP score of an edit and its target prompt: 100 * max(cos(image, text), 0), as torchmetrics'
      CLIPScore, with a transformers ``CLIPModel`` (e.g. openai/clip-vit-large-patch14);
    - DINO structure distance of the edit to the source image (Tumanyan et al. 2022, as PIE-Bench
      reports it): MSE between the cosine self-similarity matrices of the last layer's keys of a
      transformers ``ViTModel`` (e.g. facebook/dino-vitb8).

    LPIPS (Zhang et al. 2018) is torchmetrics' LearnedPerceptualImagePatchSimilarity with the
    ``lpips`` backbone (alex, vgg or squeeze): it needs torchvision and that backbone's ImageNet
    weights, which torchvision downloads once into the torch hub cache (``TORCH_HOME``)."""

    def __init__(self, clip_model: str | None = None, dino_model: str | None = None, device="cpu",
                 lpips: str | None = None) -> None:
        self.device = torch.device(device)
        self.clip = self.dino = self.lpips = None
        self.lpips_net = lpips
        if lpips:
            self.lpips = load_lpips(lpips, self.device)
        if clip_model:
            from transformers import CLIPModel, CLIPProcessor

            try:
                self.clip = CLIPModel.from_pretrained(clip_model).eval().to(self.device)
                self.clip_processor = CLIPProcessor.from_pretrained(clip_model)
            except Exception as e:  # missing files, no network, not a CLIP folder
                raise NulltextError(f"could not load the CLIP model {clip_model!r} ({one_line(e)})") from None
        if dino_model:
            from transformers import AutoImageProcessor, ViTModel

            try:
                self.dino = ViTModel.from_pretrained(dino_model, add_pooling_layer=False).eval().to(self.device)
                self.dino_processor = AutoImageProcessor.from_pretrained(dino_model)
            except Exception as e:
                raise NulltextError(f"could not load the DINO model {dino_model!r} ({one_line(e)})") from None

    @torch.no_grad()
    def clip_score(self, image, text: str) -> float:
        inputs = self.clip_processor(text=[text], images=[image.convert("RGB")], return_tensors="pt",
                                     padding=True, truncation=True).to(self.device)
        out = self.clip(**inputs)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
        return 100.0 * max(cos, 0.0)

    @torch.no_grad()
    def _key_self_similarity(self, image) -> torch.Tensor:
        keys = []
        # the last block's key projection: "encoder.layer.N.attention.attention.key" in transformers
        # 4.x, "layers.N.attention.k_proj" in 5.x
        names = [n for n, _ in self.dino.named_modules() if n.endswith((".key", ".k_proj"))]
        if not names:
            raise NulltextError("the DINO model has no attention key projection to read")
        layer = self.dino.get_submodule(names[-1])
        handle = layer.register_forward_hook(lambda _m, _i, out: keys.append(out))
        try:
            pixels = self.dino_processor(images=[image.convert("RGB")], return_tensors="pt").pixel_values
            self.dino(pixel_values=pixels.to(self.device))
        finally:
            handle.remove()
        k = torch.nn.functional.normalize(keys[0][0], dim=-1)  # (tokens, heads*dim)
        return k @ k.T  # (tokens, tokens)

    def structure_distance(self, a, b) -> float:
        return torch.nn.functional.mse_loss(self._key_self_similarity(a), self._key_self_similarity(b)).item()

    @torch.no_grad()
    def lpips_distance(self, a, b, keep: np.ndarray | None = None) -> float:
        """LPIPS of PIL images a vs b; with ``keep`` both are multiplied by it first (as PIE-Bench
        computes background LPIPS)."""
        x, y = _to_tensor(a), _to_tensor(b)
        if keep is not None:
            k = torch.from_numpy(keep.astype(np.float32))[None, None]
            x, y = x * k, y * k
        return float(self.lpips(x.to(self.device), y.to(self.device)))


def load_lpips(net: str, device) -> Callable:
    """torchmetrics' LPIPS with backbone ``net`` on images in [0, 1], or a one-line error saying
    what is missing (torchvision, or the backbone's weights where nothing can be downloaded)."""
    if net not in LPIPS_NETS:
        raise NulltextError(f"unknown LPIPS network {net!r}; choose one of {', '.join(LPIPS_NETS)}")
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # missing, or a build that does not match the installed torch
        raise NulltextError(f"LPIPS needs torchvision matching your torch ({one_line(e)}); install it, "
                            f"or leave out --lpips") from None
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).eval().to(device)
    except Exception as e:  # typically: the backbone weights cannot be downloaded here
        raise NulltextError(f"could not load LPIPS ({net}): {one_line(e)}; torchvision downloads the "
                            f"backbone weights once into TORCH_HOME, which needs network access") from None
    return metric



@dataclass
class Sample:
    id: str
    image: str
    prompt: str
    targets: list[str] = field(default_factory=list)
    blend: tuple[str, str] | None = None  # (source words, target words)
    mask: object = None  # PIE-Bench RLE: [start, length, start, length, ...] over the image's pixels


def _strip_brackets(text: str) -> str:
    return " ".join(text.replace("[", " ").replace("]", " ").split())


def read_manifest(path: str, images_root: str | None = None) -> list[Sample]:
    """Samples of a CSV / JSONL manifest or a PIE-Bench mapping_file.json."""
    if not os.path.isfile(path):
        raise NulltextError(f"manifest not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict):
                raise ValueError("a PIE-Bench mapping file is a JSON object of samples")
            root = images_root or (os.path.join(folder, "annotation_images")
                                   if os.path.isdir(os.path.join(folder, "annotation_images")) else folder)
            samples = []
            for key, item in doc.items():
                if not isinstance(item, dict) or not isinstance(item.get("image_path"), str) or not all(
                        isinstance(item.get(k, ""), str) for k in ("original_prompt", "editing_prompt",
                                                                   "blended_word")):
                    raise ValueError(f"sample {key!r} needs text fields image_path, original_prompt, "
                                     f"editing_prompt, blended_word")
                blend = item.get("blended_word") or ""
                words = blend.split()
                samples.append(Sample(
                    id=str(key), image=os.path.join(root, item.get("image_path", "")),
                    prompt=_strip_brackets(item.get("original_prompt", "")),
                    targets=[_strip_brackets(item["editing_prompt"])] if item.get("editing_prompt") else [],
                    blend=(words[0], words[1]) if len(words) == 2 else None, mask=item.get("mask")))
            return samples
        rows: list[dict]
        if ext == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        elif ext in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        else:
            raise ValueError("use a .csv, .jsonl or PIE-Bench .json manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NulltextError(f"cannot read manifest {path}: {e}") from None
    root = images_root or folder
    samples: list[Sample] = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise NulltextError(f"{path}: row {n} is not an object with 'image' and 'prompt'")
        image, prompt = row.get("image"), row.get("prompt") or row.get("caption")
        if not isinstance(image, str) or not isinstance(prompt, str) or not image or not prompt:
            raise NulltextError(f"{path}: row {n} needs text 'image' and 'prompt' fields")
        targets = row.get("targets") or row.get("target") or []
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split("|") if t.strip()]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise NulltextError(f"{path}: row {n}: 'target' must be text (several separated by |) or a list")
        blend = row.get("blend") or None
        if isinstance(blend, str):
            blend = tuple(blend.split()) if len(blend.split()) == 2 else None
        mask = row.get("mask") or None
        if isinstance(mask, str):
            try:
                mask = json.loads(mask)
            except ValueError:
                pass  # reported as that sample's failure
        samples.append(Sample(id=str(row.get("id") or n), image=os.path.join(root, image), prompt=prompt,
                              targets=list(targets), blend=blend, mask=mask))
    ids = [x.id for x in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise NulltextError(f"{path}: sample id {dup!r} appears more than once")
    return samples


def decode_rle(rle, shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    """PIE-Bench's run-length mask: pairs (start, length) over the flattened image; as its own
    decoder, the one-pixel border is marked too. Raises ValueError on a malformed encoding."""
    if not isinstance(rle, (list, tuple)) or len(rle) % 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rle):
        raise ValueError("bad RLE mask: expected a flat list of non-negative integer (start, length) pairs")
    n = shape[0] * shape[1]
    flat = np.zeros(n, dtype=bool)
    for start, length in zip(rle[0::2], rle[1::2]):
        if start >= n:
            raise ValueError(f"bad RLE mask: run starts at {start}, beyond {shape[0]}x{shape[1]}")
        flat[start:min(n, start + length)] = True
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def image_metrics(a, b, keep: np.ndarray | None = None) -> tuple[float, float, float]:
    """(PSNR dB, SSIM, MSE) of PIL images a vs b in [0, 1], with torchmetrics; with ``keep`` (h, w)
    bool, both images are multiplied by it first (PIE-Bench's background metrics)."""
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError:
        raise NulltextError("nulltext eval needs torchmetrics: pip install 'nulltext[eval]'") from None
    x, y = _to_tensor(a), _to_tensor(b)
    if keep is not None:
        k = torch.from_numpy(keep.astype(np.float32))[None, None]
        x, y = x * k, y * k
    mse = torch.mean((x - y) ** 2).item()
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0).item() if mse > 0 else math.inf
    ssim = structural_similarity_index_measure(x, y, data_range=1.0).item()
    return psnr, ssim, mse


def background_mask(rle, image_size: tuple[int, int], size: tuple[int, int], crop=(0, 0, 0, 0),
                    multiple: int = 8) -> np.ndarray:
    """Where the edit must keep the image: the complement of the RLE edit region decoded over the
    original image (width, height) = ``image_size``, cropped and resized like the image
    (nearest). (height, width) bool at ``size``."""
    from PIL import Image

    from .image import preprocess

    w, h = image_size
    region = Image.fromarray(decode_rle(rle, (h, w)).astype(np.uint8) * 255)
    region = preprocess(region, size, crop, multiple, resample=Image.Resampling.NEAREST)
    return np.asarray(region) < 128


def _peak_mb(pipe) -> float:
    """CUDA: peak allocated during this sample. CPU: the process's peak resident memory so far
    (the kernel keeps one mark per process; it includes the model)."""
    if pipe.device.type == "cuda":
        return torch.cuda.max_memory_allocated(pipe.device) / 2**20
    import resource  # POSIX only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def evaluate_sample(pipe, sample: Sample, method: str, config: InversionConfig, edit_config: EditConfig,
                    models: ModelMetrics | None = None) -> dict:
    """One (sample, method): a result row (status ok), or raises for the caller to record."""
    from .editing import edit, validate
    from .image import load_image, output_size, preprocess
    from .inversion import invert_image, reconstruct

    source = load_image(sample.image)
    cfg = dataclasses.replace(config, method=method)
    size = output_size(cfg.size, source.image.size, cfg.crop, pipe.native_size, pipe.size_multiple)
    keep = None
    if sample.mask is not None:
        keep = background_mask(sample.mask, source.image.size, size, cfg.crop, pipe.size_multiple)
    ec = edit_config
    if sample.targets:
        if sample.blend:
            ec = dataclasses.replace(ec, blend_source=(sample.blend[0],), blend_target=(sample.blend[1],))
        f = pipe.vae_scale_factor
        validate(pipe, sample.prompt, sample.targets[:1], ec, cfg.num_steps, (size[1] // f, size[0] // f))
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    t0 = time.perf_counter()
    inv = invert_image(pipe, source, sample.prompt, cfg, progress=False)
    row = {"invert_s": time.perf_counter() - t0}
    target = preprocess(source.image, inv.image_size, cfg.crop, pipe.size_multiple)
    if sample.targets:
        t0 = time.perf_counter()
        result = edit(pipe, inv, sample.targets[:1], ec, progress=False)
        row["edit_s"] = time.perf_counter() - t0
        recon = result.reconstruction  # the edit's source row is the reconstruction, bit for bit
        row["bg_psnr"], row["bg_ssim"], row["bg_mse"] = image_metrics(result.edits[0], target, keep)
        if models is not None and models.clip is not None:
            row["clip_score"] = models.clip_score(result.edits[0], sample.targets[0])
        if models is not None and models.dino is not None:
            row["structure_distance"] = models.structure_distance(target, result.edits[0])
        if models is not None and models.lpips is not None and keep is not None:
            row["bg_lpips"] = models.lpips_distance(result.edits[0], target, keep)
    else:
        recon = reconstruct(pipe, inv, progress=False)
    row["recon_psnr"], row["recon_ssim"], row["recon_mse"] = image_metrics(recon, target)
    if models is not None and models.lpips is not None:
        row["recon_lpips"] = models.lpips_distance(recon, target)
    row["peak_mb"] = _peak_mb(pipe)
    return row


def load_done(results_path: str) -> dict[tuple[str, str], dict]:
    """Recorded rows by (sample id, method); a torn last line (crash mid-write) is ignored."""
    done = {}
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    done[(row["id"], row["method"])] = row
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def _append(path: str, row: dict) -> None:
    # one write of one line in append mode: lines of several processes never interleave
    data = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def evaluate(pipe, samples: list[Sample], methods: list[str], out_dir: str, config: InversionConfig,
             edit_config: EditConfig, log: Callable[[str], None] = print,
             models: ModelMetrics | None = None, state=None) -> list[dict] | None:
    """Run every (sample, method) not yet recorded in ``out_dir/results.jsonl``; write the CSV and
    the markdown summary; return all rows. With accelerate's ``state`` (``PartialState``) of
    several processes, the pairs to run are split between them, each appends its rows, and the
    main process writes the tables and returns the rows (the others return None)."""
    os.makedirs(out_dir, exist_ok=True)
    results = os.path.join(out_dir, "results.jsonl")
    main = state is None or state.is_main_process
    # a torn last line would glue onto the next append: start on a fresh line
    if main and os.path.exists(results) and os.path.getsize(results):
        with open(results, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                with open(results, "a", encoding="utf-8") as g:
                    g.write("\n")
    if state is not None:
        state.wait_for_everyone()
    done = load_done(results)
    methods = list(dict.fromkeys(methods))
    total = len(samples) * len(methods)
    pairs = [(k, sample, method) for k, (sample, method) in
             enumerate(((s, m) for s in samples for m in methods), start=1)]
    todo = []
    for k, sample, method in pairs:
        key = settings_key(pipe, sample, method, config, edit_config, models)
        old = done.get((sample.id, method))
        if old is not None and old.get("status") == "ok" and old.get("settings") == key:
            if main:
                log(f"[{k}/{total}] {sample.id} {method}: recorded, skipped")
            continue
        todo.append((k, sample, method, key))
    if state is not None:
        with state.split_between_processes(todo) as mine:
            mine = list(mine)
    else:
        mine = todo
    for k, sample, method, key in mine:
        row = {"id": sample.id, "method": method, "image": sample.image, "prompt": sample.prompt,
               "target": sample.targets[0] if sample.targets else "", "settings": key}
        try:
            row.update(evaluate_sample(pipe, sample, method, config, edit_config, models), status="ok", reason="")
            log(f"[{k}/{total}] {sample.id} {method}: PSNR {row['recon_psnr']:.2f} dB"
                + (f", background PSNR {row['bg_psnr']:.2f} dB" if "bg_psnr" in row else ""))
        except Exception as e:  # any failure of one sample is recorded; the run goes on
            reason = one_line(e)
            if "out of memory" in reason.lower() and torch.cuda.is_available():
                torch.cuda.empty_cache()
            row.update(status="failed", reason=reason)
            log(f"[{k}/{total}] {sample.id} {method}: FAILED: {reason}")
        _append(results, row)
    if state is not None:
        state.wait_for_everyone()
        if not main:
            return None
    done = load_done(results)
    rows = [done[(s.id, m)] for s in samples for m in methods if (s.id, m) in done]
    write_tables(rows, methods, out_dir)  # this run's samples and methods only
    return rows


def settings_key(pipe, sample: Sample, method: str, config: InversionConfig, edit_config: EditConfig,
                 models) -> str:
    """What a recorded row was computed from: a rerun with other settings recomputes it."""
    doc = {"model": pipe.fingerprint.get("config_sha256"), "weights": pipe.fingerprint.get("weights_sample_sha256"),
           "inversion": dataclasses.replace(config, method=method).to_dict(), "edit": edit_config.to_dict(),
           "sample": dataclasses.asdict(sample),
           "metrics": [getattr(models, "clip", None) is not None, getattr(models, "dino", None) is not None]
           + ([getattr(models, "lpips_net", "?")] if getattr(models, "lpips", None) is not None else [])}
    # (the LPIPS backbone only when used, so keys recorded before LPIPS existed stay valid)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_tables(rows: list[dict], methods: list[str], out_dir: str) -> None:
    columns = ["id", "method", "status", "reason", "image", "prompt", "target", *METRICS]

    def write_csv(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)

    atomic_write(os.path.join(out_dir, "results.csv"), write_csv, force=True)
    lines = ["| method | samples ok | failed | " + " | ".join(METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for m in methods:
        ok = [r for r in rows if r["method"] == m and r.get("status") == "ok"]
        failed = sum(1 for r in rows if r["method"] == m and r.get("status") != "ok")
        cells = []
        for key in METRICS:
            vals = [r[key] for r in ok if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            cells.append(f"{sum(vals) / len(vals):.4g}" if vals else "-")
        lines.append(f"| {m} | {len(ok)} | {failed} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + ("\n\nMeans over the samples that succeeded; '-': not computed (LPIPS, CLIP score "
                                "and structure distance need --lpips, --clip-model and --dino-model).\n")
    def write_md(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(os.path.join(out_dir, "summary.md"), write_md, force=True)

"""``nulltext eval``: the job runner (:mod:`nulltext.jobs`) with a job that inverts (and edits) a
sample with one inversion method and measures reconstruction and background preservation; the
metrics and the tables are here.

Every line of the manifest (CSV or JSONL as for ``nulltext batch``, or PIE-Bench's
``mapping_file.json`` through :mod:`nulltext.pie_bench`) runs once per method. A sample's ``mask``
marks the edited region: the background metrics are computed outside it (the edit itself is not
masked, or those metrics would measure nothing). Each (sample, method) is recorded by the runner
(``OUTDIR/records/``) and its row appended to ``OUTDIR/results.jsonl`` as soon as it exists
(flushed and synced), so a crash loses at most the samples in flight and a rerun skips every
recorded one. ``results.csv`` and ``summary.md`` are rewritten at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from .errors import NulltextError, one_line
from .files import atomic_write
from .jobs import Job, ResultStore, each, run

METRICS = ("recon_psnr", "recon_ssim", "recon_mse", "recon_lpips", "zT_loglik", "bg_psnr", "bg_ssim", "bg_mse",
           "bg_lpips", "edit_lpips", "clip_score", "structure_distance", "invert_s", "edit_s", "peak_mb")
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


def background_mask(mask, image_size: tuple[int, int], size: tuple[int, int], crop=(0, 0, 0, 0)) -> np.ndarray:
    """Where the edit must keep the image: the complement of the edited region ``mask`` (a mask
    image's path: white = edited; the photo's size ``image_size``, then cut and resized like the
    photo, nearest; or the inverted size). (height, width) bool at ``size``."""
    from .image import load_mask

    return ~load_mask(mask, size, image_size, crop).numpy()


def _peak_mb(pipe) -> float:
    """CUDA: peak allocated during this sample. CPU: the process's peak resident memory so far
    (the kernel keeps one mark per process; it includes the model)."""
    if pipe.device.type == "cuda":
        return torch.cuda.max_memory_allocated(pipe.device) / 2**20
    import resource  # POSIX only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def evaluate_job(pipe, job: Job, models: ModelMetrics | None = None, last: dict | None = None) -> dict:
    """One (sample, method): the metrics of a result row, or raises for the runner to record.
    ``last``: the previous job's inversion, reused when this job inverts the same photo and caption
    with the same settings (eval's edit methods of one inversion run one after the other)."""
    from .editing import EditRequest, PhotoLatent, edit, plan
    from .image import load_image, output_size, preprocess
    from .inversion import InversionRequest, invert_progressive, reconstruct

    source = load_image(job.image)
    cfg, ec = job.inversion, job.edit
    size = output_size(cfg.size, source.image.size, cfg.crop, pipe.native_size, pipe.size_multiple)
    keep = None if job.mask is None else background_mask(job.mask, source.image.size, size, cfg.crop)
    edit_plan = None
    if job.targets:  # the edit's checks, once, before the inversion
        f = pipe.vae_scale_factor
        # (the job reader checked the caption and the targets)
        edit_plan = plan(pipe, EditRequest((job.targets[0],), ec), job.prompt, cfg.num_steps,
                         (size[1] // f, size[0] // f), size, source.image.size, cfg.crop)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    key = (job.image, job.prompt, cfg)
    if last is not None and last.get("key") == key:
        inv, invert_s = last["inversion"], last["invert_s"]
    else:
        t0 = time.perf_counter()
        (_, inv), = invert_progressive(pipe, InversionRequest((source,), (job.prompt,), cfg, 1), progress=False)
        invert_s = time.perf_counter() - t0
        if last is not None:
            last.clear()
            last.update(key=key, inversion=inv, invert_s=invert_s)
    row = {"invert_s": invert_s, "zT_loglik": inv.latent_log_likelihood}
    target = preprocess(source.image, inv.image_size, cfg.crop, pipe.size_multiple)
    if job.targets:
        from_noise = ec.method == "sdedit" and ec.sdedit_from == "noise"
        t0 = time.perf_counter()
        # plain SDEdit edits the photo's latent, not the inversion (which gives the reconstruction)
        result = edit(pipe, PhotoLatent.of_inversion(pipe, inv, target) if from_noise else inv, edit_plan,
                      progress=False)
        row["edit_s"] = time.perf_counter() - t0
        # the edit's source row is the reconstruction, bit for bit (plain SDEdit's is the VAE's round trip)
        recon = reconstruct(pipe, inv, progress=False) if from_noise else result.reconstruction
        row["bg_psnr"], row["bg_ssim"], row["bg_mse"] = image_metrics(result.edits[0], target, keep)
        if models is not None and models.clip is not None:
            row["clip_score"] = models.clip_score(result.edits[0], job.targets[0])
        if models is not None and models.dino is not None:
            row["structure_distance"] = models.structure_distance(target, result.edits[0])
        if models is not None and models.lpips is not None:
            row["edit_lpips"] = models.lpips_distance(result.edits[0], target)  # to the input (the paper's Fig. 8)
            if keep is not None:
                row["bg_lpips"] = models.lpips_distance(result.edits[0], target, keep)
    else:
        recon = reconstruct(pipe, inv, progress=False)
    row["recon_psnr"], row["recon_ssim"], row["recon_mse"] = image_metrics(recon, target)
    if models is not None and models.lpips is not None:
        row["recon_lpips"] = models.lpips_distance(recon, target)
    row["peak_mb"] = _peak_mb(pipe)
    return row


def load_done(results_path: str) -> dict[tuple[str, str], dict]:
    """The rows of a ``results.jsonl`` by (sample id, method), the last of each; a torn line (a
    crash mid-write) is ignored."""
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


# columns of a manifest that have no meaning in an evaluation: a line setting one fails (it is not
# dropped silently)
NOT_EVALUATED = {"method": "nulltext eval runs every sample with each of its --methods",
                 "mask_mode": "nulltext eval does not mask the edit (its mask marks the region the background "
                              "metrics leave out)"}


def _metric_settings(models: ModelMetrics | None) -> list:
    """What the metric models add to a job's key: a rerun with other metrics recomputes it."""
    return [getattr(models, "clip", None) is not None, getattr(models, "dino", None) is not None,
            getattr(models, "lpips_net", None) if getattr(models, "lpips", None) is not None else None]


def _with_editor(job: Job, editor: str | None) -> tuple[object, str]:
    """The job's edit config with the edit method ``editor`` (None: as it is), or the reason it cannot."""
    if editor is None or job.edit is None:
        return job.edit, ""
    try:
        return dataclasses.replace(job.edit, method=editor), ""
    except NulltextError as e:
        return job.edit, f"edit method {editor}: {e}"


def evaluate(pipe, jobs: list[Job], methods: list[str], out_dir: str, log: Callable[[str], None] = print,
             models: ModelMetrics | None = None, state=None, editors: list[str] | None = None) -> list[dict] | None:
    """Run every (sample, method) not yet recorded, through the runner (split between
    accelerate's processes where ``state`` has several); write the CSV and the markdown summary and
    return this run's rows on the main process (None on the others). ``editors``: edit methods
    each (sample, method) is edited with, labelled ``METHOD/EDITOR`` (None: the jobs' own, labelled
    ``METHOD``); one inversion serves them all (its time is in each row)."""
    methods = list(dict.fromkeys(methods))
    editors = list(dict.fromkeys(editors)) if editors else None
    labels = [m if editors is None else f"{m}/{e}" for m in methods for e in (editors or [None])]
    runs = []
    for job in jobs:
        refused = [f"column {c} does not apply: {why}" for c, why in NOT_EVALUATED.items() if c in job.columns]
        if editors is not None and "edit_method" in job.columns:
            refused.append("column edit_method does not apply: nulltext eval edits with each of its --edit-methods")
        for method in methods:
            inversion = dataclasses.replace(job.inversion, method=method) if job.inversion else None
            for editor in editors or [None]:
                edit_cfg, why = _with_editor(job, editor)
                runs.append(dataclasses.replace(job, inversion=inversion, edit=edit_cfg,
                                                variant=method if editor is None else f"{method}/{editor}",
                                                error=job.error or "; ".join(refused + ([why] if why else []))))
    number = {id(job): k for k, job in enumerate(runs, 1)}
    total = len(runs)

    def describe(job: Job, row: dict) -> str:
        head = f"[{number[id(job)]}/{total}] {job.id} {job.variant}"
        if row["status"] != "ok":
            return f"{head}: FAILED: {row['reason']}"
        return (f"{head}: PSNR {row['recon_psnr']:.2f} dB"
                + (f", background PSNR {row['bg_psnr']:.2f} dB" if "bg_psnr" in row else ""))

    def skipped(job: Job) -> None:
        log(f"[{number[id(job)]}/{total}] {job.id} {job.variant}: recorded, skipped")

    store = ResultStore(out_dir, per_job_folder=False, log="results.jsonl", fields=lambda job: {
        "method": job.variant, "target": job.targets[0] if job.targets else ""})
    last: dict = {}  # the inversion the edit methods of one (sample, method) share
    done = run(runs, each(lambda job: evaluate_job(pipe, job, models, last)), store, pipe.fingerprint,
               extra=_metric_settings(models), state=state, log=log, describe=describe, on_skip=skipped)
    if done is None:
        return None
    rows = done[0]
    write_tables(rows, labels, out_dir)  # this run's samples and methods only
    return rows


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

"""The commands: each ``cmd_NAME(args)`` runs ``nulltext NAME`` on parsed arguments and returns its
exit status; errors the user can fix are raised as :class:`NulltextError` (one line, exit 2)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings

from .. import families
from ..config import DEFAULT_MODEL, EDIT_METHODS, METHODS, InversionConfig
from ..errors import NulltextError, NulltextWarning, one_line
from ..files import check_writable, edit_file_name, image_format, save_image
from ..options import options
from ..plots import plot_losses
from .args import edit_config, given_options, inversion_config


def _load_pipe(args, model: str):
    from ..models import load_pipeline

    return load_pipeline(model, device=args.device, dtype=args.dtype, low_memory=args.low_memory,
                         compile=getattr(args, "compile", False), t5=not args.no_t5)


def _inversion_name(path: str, flag: str, folder: bool = False) -> None:
    """An inversion file is safetensors: refuse a name that says otherwise (out.png would hold
    safetensors without a word)."""
    if not path.lower().endswith(".safetensors"):
        hint = " (or a folder ending in /)" if folder else ""
        raise NulltextError(f"{flag} {path}: an inversion file is safetensors; give a name ending in "
                            f".safetensors{hint}")


def _invert_outputs(args) -> list[str]:
    """The inversion file of each image: -o itself for one image (unless it is a folder or ends
    in a separator); otherwise -o is a folder and each file gets its image's name, with -2, -3,
    ... added until no two images share a file."""
    out = args.output
    as_folder = len(args.image) > 1 or os.path.isdir(out) or out.endswith((os.sep, "/"))
    if not as_folder:
        _inversion_name(out, "-o", folder=True)
        return [out]
    if os.path.exists(out) and not os.path.isdir(out):
        raise NulltextError(f"-o {out} is a file; with {len(args.image)} images, -o names a folder for their "
                            f"inversion files")
    used: set[str] = set()
    paths = []
    for image in args.image:
        stem = os.path.splitext(os.path.basename(image))[0] or "image"
        name, n = stem, 1
        while name.casefold() in used:  # case-insensitive file systems too
            n += 1
            name = f"{stem}-{n}"
        used.add(name.casefold())
        paths.append(os.path.join(out, f"{name}.safetensors"))
    return paths


def cmd_invert(args) -> int:
    from ..inversion import invert_progressive, request, summary

    # every check that needs no model, before loading one: the prompts, the batch size, each
    # photo's header (the photo is decoded once, when it is inverted)
    req = request(args.image, args.prompt, inversion_config(args, args.method), args.batch_size, what="--prompt")
    outputs = _invert_outputs(args)
    for output in outputs:
        check_writable(output, args.force)
    pipe = _load_pipe(args, args.model)

    def done(index: int, inv, photo) -> None:  # each file is written as soon as its batch is done
        name, output = args.image[index], outputs[index]
        inv.save(output, force=args.force, reproducible=args.reproducible)
        quality = None
        if args.check:
            from ..image import psnr
            from ..inversion import reconstruct

            with warnings.catch_warnings():  # the prompt's warnings were already shown by the inversion
                warnings.simplefilter("ignore", NulltextWarning)
                image = reconstruct(pipe, inv, progress=not args.quiet)
            quality = psnr(image, photo)
        line = f"inverted {name} {summary(inv, quality)}"
        print(line)
        print(f"wrote {output}", flush=True)

    try:
        # the preprocessed photos kept only for --check (queued photos are not held in memory otherwise)
        for index, inv, *photo in invert_progressive(pipe, req, progress=not args.quiet, photos=args.check):
            done(index, inv, photo[0] if photo else None)
    except Exception as e:
        if args.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise NulltextError(f"--compile failed on this machine ({one_line(e)}); run without --compile") from None
        raise
    return 0


def cmd_reconstruct(args) -> int:
    from ..inversion import Inversion, reconstruct

    check_writable(args.output, args.force)
    image_format(args.output)
    inv = Inversion.load(args.inversion)
    pipe = _load_pipe(args, args.model or inv.model.id)
    from ..storage import check_fits

    check_fits(inv, pipe, args.inversion)
    img = reconstruct(pipe, inv, progress=not args.quiet)
    save_image(img, args.output, force=args.force)
    print(f"wrote {args.output}")
    return 0


def cmd_info(args) -> int:
    from ..inversion import Inversion

    if args.plot:
        check_writable(args.plot, args.force)
        if image_format(args.plot) != "PNG":
            raise NulltextError(f"--plot writes PNG: give a .png name, not {args.plot}")
    inv = Inversion.load(args.inversion)
    if args.plot:
        plot_losses(inv, args.plot, force=args.force)
    if args.json:
        # the file's metadata, and what is computed from its tensors
        print(json.dumps({**inv.metadata(), "latent_T_log_likelihood": inv.latent_log_likelihood}, indent=2,
                         sort_keys=True))
        return 0
    c, model, image, run, opt = inv.config, inv.model, inv.image, inv.run, inv.optimisation
    w, h = inv.image_size
    print(f"file           {args.inversion}")
    print(f"format         nulltext-inversion v{inv.format_version}")
    print(f"method         {inv.method}" + ("" if opt else "  (no optimisation)"))
    print(f"model          {model.id}  (config {model.fingerprint.get('config_sha256', '?')[:12]})")
    print(f"prompt         {inv.prompt!r}")
    print(f"image          {image.name}  sha256 {(image.sha256 or '?')[:16]}  "
          f"original {'x'.join(map(str, image.original_size or ()))} {image.original_mode}")
    print(f"preprocessing  {w}x{h}, crop L,R,T,B = {','.join(map(str, c.crop))}")
    print(f"latent_T       {tuple(inv.latent_T.shape)}   null_embeddings {tuple(inv.null_embeddings.shape)}"
          + (f"   corrections {tuple(inv.corrections.shape)}" if inv.corrections is not None else "")
          + (f"   cond_embeddings {tuple(inv.cond_embeddings.shape)}" if inv.cond_embeddings is not None else ""))
    print(f"steps T        {c.num_steps}   guidance {c.guidance_scale}   inner steps {c.num_inner_steps}   "
          f"early stop {c.early_stop_epsilon:g} + i*{c.early_stop_slope:g}   lr {c.lr:g}")
    sampler = families.get(model.family).sampler
    shift = getattr(c.scheduler, "shift", None)  # flow matching's (SD3): the schedule's shift of the sigmas
    print(f"inversion      {sampler.NAME} at guidance {c.inversion_guidance:g}"
          + (f" (scheduler shift {shift:g})" if shift is not None else "") + "; z_T log-likelihood "
          f"{inv.latent_log_likelihood:.4f} per dimension under N(0, I) (Gaussian noise: -1.4189)")
    print(f"family         {model.family}, predicts {model.prediction_type}")
    scales = opt.loss_scales if opt else None
    print(f"precision      {run.dtype or None} on {run.device or None}"
          + (f", loss scaled by 2^{int(math.log2(min(scales)))} to 2^{int(math.log2(max(scales)))}" if scales else "")
          + (f", in a batch of {run.batch_size}" if run.batch_size > 1 else ""))
    if inv.timings:
        print("timings        " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}s"
                                             for k, v in dataclasses.asdict(inv.timings).items()))
    if opt:
        its = opt.iterations
        print(f"iterations     {sum(its)} in all (max {c.num_inner_steps * len(its)})")
        if opt.noise_seed is not None:
            print(f"noise seed     {opt.noise_seed}")
        if opt.diverged_steps:
            print(f"diverged       at step(s) {', '.join(str(i + 1) for i in opt.diverged_steps)} of {len(its)}: "
                  f"the loss rose from where the step started (try a lower --lr)")
        print(f"\n{'i':>4} {'t':>5} {'iters':>5} {'lr':>9} {'loss first':>11} {'loss last':>11} {'loss after':>11}")
        timesteps = _timesteps(inv)
        for i, it in enumerate(its):
            print(f"{i:>4} {timesteps[i]:>5} {it:>5} {opt.lrs[i]:>9.2e} {opt.losses_first[i]:>11.3e} "
                  f"{opt.losses_last[i]:>11.3e} {opt.losses_after[i]:>11.3e}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _timesteps(inv) -> list[int]:
    """The timesteps of the file's steps, from the sampler of the family it was made with."""
    family = families.get(inv.model.family)
    sampler = family.sampler
    tokens = family.file_image_seq_len(tuple(inv.latent_T.shape[-2:]))  # a schedule shifted by the image's size
    return list(sampler.schedule(sampler.make_scheduler(inv.config.scheduler), inv.num_steps, tokens).timesteps)


def _is_inversion_path(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def _warn_inversion_options_ignored(args) -> None:
    """Inversion options given with an inversion file have no effect: say so instead of silently
    using the file's settings (the options whose metadata says the file's values are checked
    instead, --size, are not named)."""
    given = [flag for o, flag in given_options(InversionConfig, args, qualified=True) if o.with_file == "ignored"]
    if given:
        warnings.warn(f"{', '.join(given)} apply to an IMAGE input only; {args.input} already holds an "
                      f"inversion made with its own settings (see nulltext info), so they are ignored",
                      NulltextWarning)


def _source(args, make_plan, from_noise: bool = False):
    """(pipe, inversion, plan, photo) from the INPUT argument: an inversion file (checked against the
    model and the options; photo None), or an image inverted now with --prompt (photo: the
    preprocessed photo it inverted). ``make_plan(pipe, prompt, num_steps, latent_hw, image_size,
    original_size, crop)`` plans the edit (its checks) before any inversion work. ``from_noise``
    (plain SDEdit): the image is encoded, not inverted, and "inversion" is its PhotoLatent."""
    from ..editing.planning import PhotoLatent, original_size
    from ..image import encode, load_image, output_size, preprocess
    from ..inversion import Inversion, invert_progressive, request
    from ..storage import check_fits

    if from_noise and _is_inversion_path(args.input):
        raise NulltextError(f"--from noise noises the photo's latent z0, which the inversion file {args.input} does "
                            f"not store: give the photo itself (IMAGE --prompt CAPTION)")
    if from_noise and args.save_inversion:
        raise NulltextError("--from noise does not invert the photo: there is no inversion to save (--save-inversion)")
    if from_noise:
        _warn_inversion_options_unused(args)  # after the refusals: an error is one line
    if _is_inversion_path(args.input):
        if args.save_inversion:
            raise NulltextError("--save-inversion only applies to an IMAGE input")
        inv = Inversion.load(args.input)
        if args.prompt is not None and args.prompt != inv.prompt:
            raise NulltextError(f"{args.input} inverts the prompt {inv.prompt!r}; the source prompt of an edit "
                                f"is the inversion's (leave out --prompt)")
        if args.size is not None and (args.size not in (inv.config.size, max(inv.image_size))
                                      if isinstance(args.size, int) else tuple(args.size) != inv.image_size):
            asked = args.size if isinstance(args.size, int) else "x".join(map(str, args.size))
            raise NulltextError(f"{args.input} was inverted at {inv.image_size[0]}x{inv.image_size[1]} pixels, "
                                f"not {asked}; invert the image again at that size")
        _warn_inversion_options_ignored(args)  # after the refusals: an error is one line
        pipe = _load_pipe(args, args.model or inv.model.id)
        check_fits(inv, pipe, args.input)
        plan = make_plan(pipe, inv.prompt, inv.num_steps, tuple(inv.latent_T.shape[-2:]), inv.image_size,
                         original_size(inv), inv.config.crop)
        return pipe, inv, plan, None
    if args.prompt is None:
        raise NulltextError(f"{args.input} is an image: pass --prompt with its caption (or give an inversion "
                            f"file made by nulltext invert)")
    if args.save_inversion:
        _inversion_name(args.save_inversion, "--save-inversion")
        check_writable(args.save_inversion, args.force)
    config = inversion_config(args, args.inversion_method)
    image = load_image(args.input)  # decoded once: checked here, inverted below
    inversion = request([image], [args.prompt], config, what="--prompt")  # the prompt checked once
    pipe = _load_pipe(args, args.model or DEFAULT_MODEL)
    w, h = output_size(config.size, image.image.size, config.crop, pipe.native_size, pipe.size_multiple)
    f = pipe.vae_scale_factor
    plan = make_plan(pipe, args.prompt, config.num_steps, (h // f, w // f), (w, h), tuple(image.image.size),
                     config.crop)
    if from_noise:  # plain SDEdit: the photo's latent, no inversion
        pixels = preprocess(image.image, size=(w, h), crop=config.crop, multiple=pipe.size_multiple)
        return pipe, PhotoLatent(encode(pipe, pixels), args.prompt, config, (w, h), tuple(image.image.size)), plan, pixels
    (_, inv, photo), = invert_progressive(pipe, inversion, progress=not args.quiet, photos=True)
    if args.save_inversion:
        inv.save(args.save_inversion, force=args.force)
        print(f"wrote {args.save_inversion}")
    return pipe, inv, plan, photo


def _warn_inversion_options_unused(args) -> None:
    """Plain SDEdit encodes the photo without inverting it: of the inversion options, only the steps,
    guidance, size and crop act."""
    acting = ("num_steps", "guidance_scale", "size", "crop")
    given = [flag for o, flag in given_options(InversionConfig, args, qualified=True) if o.name not in acting]
    if given:
        warnings.warn(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to an inversion; --from noise "
                      f"inverts nothing, so {'they are' if len(given) > 1 else 'it is'} ignored", NulltextWarning)


def _warn_ignored(args, config) -> None:
    """Options the chosen method does not use (their metadata names the methods they act on) are
    reported, not silently dropped."""
    default = type(config)()
    groups: dict[tuple[str, ...], list[str]] = {}  # the methods an option acts on -> its flags given
    for o in options(config):
        if (o.flag and o.methods and config.method not in o.methods
                and any(getattr(config, name) != getattr(default, name) for name in o.names)):
            groups.setdefault(tuple(o.methods), []).append(o.flag)
    for methods, flags in groups.items():
        verb = "applies" if len(flags) == 1 else "apply"
        names = ", ".join(methods[:-1]) + " or " + methods[-1] if len(methods) > 1 else methods[0]
        warnings.warn(f"{', '.join(flags)} {verb} to --method {names} only; ignored with {config.method}",
                      NulltextWarning)


def cmd_edit(args) -> int:
    from ..editing import edit, maps_from_store, plan, request
    from ..visual import attention_grid, side_by_side

    config = edit_config(args)
    # every check that needs no model, the mask's decoding included, before loading one
    req = request(args.target, config, mask=args.mask, what="--target")
    if args.attention and config.method != "p2p":
        raise NulltextError(f"--attention records the maps of P2P edits; leave it out with --method {config.method}")
    _warn_ignored(args, config)
    out = args.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise NulltextError(f"output {out} is a file; -o takes a folder")
    names = ["reconstruction.png"] + [edit_file_name(k, t) for k, t in enumerate(req.targets, 1)] + ["grid.png"]
    if args.attention:
        names.append("attention.png")
    paths = [os.path.join(out, n) for n in names]
    for path in paths:
        check_writable(path, args.force)

    def make_plan(pipe, prompt, num_steps, latent_hw, image_size, original_size, crop):
        return plan(pipe, req, prompt, num_steps, latent_hw, image_size, original_size, crop,
                    attention=args.attention)

    from_noise = config.method == "sdedit" and config.sdedit_from == "noise"
    pipe, inv, edit_plan, photo = _source(args, make_plan, from_noise)
    result = edit(pipe, inv, edit_plan, progress=not args.quiet)
    labels = [f"{'VAE round trip' if from_noise else 'reconstruction'}: {inv.prompt}"] + [
        f"{m}{' from noise' if from_noise else ''}: {t}" for m, t in zip(result.modes, req.targets)]
    shown = result.images
    if photo is not None:  # a photo inverted in this run: the grid shows it first
        shown, labels = [photo, *shown], [f"input: {os.path.basename(args.input)}", *labels]
    pictures = [*result.images, side_by_side(shown, labels)]
    if args.attention:
        am = maps_from_store(pipe, edit_plan.attention, edit_plan.attention_size, result.prompts, result.images)
        pictures.append(attention_grid(am.maps, am.tokens, am.images))
    for img, path in zip(pictures, paths):  # everything computed: write it all, each atomically
        save_image(img, path, force=args.force)
    for mode, t in zip(result.modes, req.targets):
        print(f"{mode:>8}: {t}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_attention(args) -> int:
    from ..editing import attention_maps, plan, request
    from ..visual import attention_grid

    check_writable(args.output, args.force)
    image_format(args.output)
    if not 0.0 <= args.overlay <= 1.0:
        raise NulltextError(f"--overlay must lie in [0, 1], got {args.overlay}")
    config = edit_config(args)
    if config.method != "p2p":
        raise NulltextError("attention maps are recorded for P2P edits; use --method p2p")
    if not args.target and config.blend:
        warnings.warn("--blend acts on edits; without --target it is ignored", NulltextWarning)
    req = request(args.target, config, what="--target", required=False)  # no target: the source's maps alone

    def make_plan(pipe, prompt, num_steps, latent_hw, image_size, original_size, crop):
        return plan(pipe, req, prompt, num_steps, latent_hw, image_size, original_size, crop, attention=True)

    pipe, inv, edit_plan, _photo = _source(args, make_plan)
    am = attention_maps(pipe, inv, edit_plan, progress=not args.quiet)
    grid = attention_grid(am.maps, am.tokens, am.images, cell=args.cell, overlay=args.overlay)
    save_image(grid, args.output, force=args.force)
    print(f"cross-attention at {am.size[0]}x{am.size[1]} averaged over {inv.num_steps} steps")
    print(f"wrote {args.output}")
    return 0


def _read_jobs(args, inversion, edit, root: str | None = None, limit: int | None = None, pie_bench: bool = False,
               noun: str = "jobs"):
    """The jobs of ``args.manifest`` (nulltext batch's and eval's one reader); with ``pie_bench``, a
    PIE-Bench mapping file (.json) through its adapter, its masks written into OUTDIR/pie-bench-masks/
    (batch reads a .json as JSONL, as it always has)."""
    from ..jobs import jobs_from_rows, read_rows

    path = args.manifest
    if pie_bench and path.lower().endswith(".json"):
        from ..pie_bench import read_mapping_file

        rows = read_mapping_file(path, os.path.join(args.output, "pie-bench-masks"), root, limit)
    else:
        rows = read_rows(path)[:limit]
    jobs = jobs_from_rows(rows, inversion, edit, root or os.path.dirname(os.path.abspath(path)), args.protocol)
    if not jobs:
        raise NulltextError(f"{path} has no {noun}")
    return jobs


def _names(text: str, known, what: str, where: str = "") -> list[str]:
    """A comma-separated list of names, each one of ``known`` (and at least one)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if not names or unknown:
        raise NulltextError(f"unknown {what} {', '.join(unknown) or '(none)'}{where}; choose from {', '.join(known)}")
    return names


def cmd_eval(args) -> int:
    from ..evaluation import evaluate
    from ..jobs import check_manifest, process_state

    methods = _names(args.methods, METHODS, "method")
    editors = None if args.edit_methods is None else _names(args.edit_methods, EDIT_METHODS, "edit method",
                                                           " in --edit-methods")
    config = inversion_config(args, methods[0])
    edit_cfg = edit_config(args)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NulltextError(f"output {args.output} is a file; -o takes a folder")
    check_manifest(args.manifest)
    models = None
    if args.clip_model or args.dino_model or args.lpips:  # their errors before the long model load
        from ..evaluation import ModelMetrics
        from ..models import resolve_device

        models = ModelMetrics(args.clip_model, args.dino_model, device=resolve_device(args.device),
                              lpips=args.lpips)
    jobs = _read_jobs(args, config, edit_cfg, args.images_root, args.limit, pie_bench=True, noun="samples")
    state = process_state()  # one process, or those of accelerate launch: the jobs are split
    pipe = _load_pipe(args, args.model)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    rows = evaluate(pipe, jobs, methods, args.output, log=log, models=models, state=state, editors=editors)
    if rows is None:  # not the main process: the main one reports
        return 0
    with open(os.path.join(args.output, "summary.md"), encoding="utf-8") as f:
        print(f.read().split("\n\n")[0])
    skipped = []
    if not args.lpips:
        skipped.append("LPIPS needs --lpips alex|vgg|squeeze (torchvision and its backbone weights)")
    if not args.clip_model:
        skipped.append("CLIP score needs --clip-model")
    if not args.dino_model:
        skipped.append("the DINO structure distance needs --dino-model")
    if skipped:
        print(f"note: {'; '.join(skipped)}")
    for name in ("results.jsonl", "results.csv", "summary.md"):
        print(f"wrote {os.path.join(args.output, name)}")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed and len(failed) == len(rows):
        print(f"nulltext: error: every sample failed ({len(failed)} of {len(rows)}; first: "
              f"{failed[0]['id']} {failed[0]['method']}: {failed[0]['reason']}); see "
              f"{os.path.join(args.output, 'results.jsonl')}", file=sys.stderr)
        return 1
    return 0


def cmd_batch(args) -> int:
    from ..batch import batch
    from ..jobs import process_state

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NulltextError(f"output {args.output} is a file; -o takes a folder")
    jobs = _read_jobs(args, inversion_config(args, args.inversion_method), edit_config(args))
    state = process_state()
    pipe = _load_pipe(args, args.model)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    done = batch(pipe, jobs, args.output, args.batch_size, progress=not args.quiet, log=log, state=state)
    if done is None:  # not the main process: the main one reports
        return 0
    rows, skipped = done
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} jobs done" + (f" ({skipped} by an earlier run)" if skipped else "")
          + (f", {len(failed)} failed:" if failed else ""))
    for r in failed:
        print(f"  {r['id']}: {r['reason']}")
    print(f"wrote {os.path.join(args.output, 'summary.csv')}")
    return 1 if failed else 0


def cmd_serve(args) -> int:
    from ..ui import check_address, require_gradio, serve

    require_gradio()  # before minutes of model loading
    check_address(args.host, args.port)
    pipe = _load_pipe(args, args.model)
    try:
        serve(pipe, host=args.host, port=args.port, max_pixels=args.max_pixels, quiet=True,
              on_start=lambda: print(f"nulltext: serving {args.model} on http://{args.host}:{args.port} "
                                     f"(Ctrl-C to stop)", flush=True))
    except OSError as e:  # the port is taken, the address is not this machine's, ...
        raise NulltextError(f"cannot serve on {args.host}:{args.port} ({one_line(e, limit=None)}); choose another "
                            f"--port or --host") from None
    return 0


COMMANDS = {"batch": cmd_batch, "serve": cmd_serve, "invert": cmd_invert, "reconstruct": cmd_reconstruct, "edit": cmd_edit, "attention": cmd_attention,
            "eval": cmd_eval, "info": cmd_info}

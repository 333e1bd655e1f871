"""The ``ase-ray`` command line: thin, it parses and calls the modules that do the work."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from typer.core import TyperGroup

from ase_ray.errors import AseRayError


class OneLineUsageErrors(TyperGroup):
    """Usage errors (unknown option, missing argument, a value of the wrong type) as one
    ``error:`` line and exit 2, like every other user error, instead of a boxed panel; the same
    for ``ase-ray`` and the ``jobs/*.py`` entry points, which call the app with their arguments."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's exceptions (typer vendors click)
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
                typer.echo(ctx.get_help(), err=True)  # a bare `ase-ray data`: its help, as before
            else:
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                typer.secho(f"error: {one_line(exc.format_message())}{hint}", err=True, fg=typer.colors.RED)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        # Without standalone mode an Exit's code comes back, or the command's value (None here).
        sys.exit(code if isinstance(code, int) else 0)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


app = typer.Typer(
    cls=OneLineUsageErrors,
    help="ase-ray: multimodal defect classification (PFA + CMAF) as a Ray workflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Show and check configs.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: import, validate, generate, split, augment.", no_args_is_help=True)
import_app = typer.Typer(help="Import a dataset into the manifest format.", no_args_is_help=True)
models_app = typer.Typer(help="Hub models: download the configured ones once, for a cluster.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
data_app.add_typer(import_app, name="import")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a setting: --set data.synth.scale=0.2")
]
ClassesOpt = Annotated[Optional[str], typer.Option(help="Comma-separated class list.")]


@app.callback()
def console_options(
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", envvar="ASE_RAY_VERBOSE",
        help="Show Ray's, Ray Data's, Ray Train's, Tune's and MLflow's own output (progress bars, worker "
        "logs) as well. Default: our own lines only; the rest goes to Ray's session log folder, named once "
        "as `logs: ...`. Give it before the command: `ase-ray --verbose train`.")] = False,
):
    """ase-ray: multimodal defect classification (PFA + CMAF) as a Ray workflow."""
    from ase_ray.console import configure_console

    configure_console(verbose)


def user_errors(fn: Callable) -> Callable:
    """Print user-facing errors as one line and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AseRayError as exc:
            typer.secho(f"error: {one_line(exc)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return wrapper


def _config(config: Path | None, overrides: list[str] | None, extra: list[str] = ()):
    from ase_ray.config import load_config

    return load_config(config, [*(overrides or []), *extra])


def _split_classes(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


# ------------------------------------------------------------------------------------------ config
@config_app.command("show")
@user_errors
def config_show(config: ConfigOpt = None, set_: SetOpt = None, flat: bool = typer.Option(False, help="a.b.c keys")):
    """Print the effective config (defaults + file + overrides) as YAML."""
    from ase_ray.config import dump_config, flatten_config

    cfg = _config(config, set_)
    if flat:
        for key, value in flatten_config(cfg).items():
            typer.echo(f"{key}={json.dumps(value)}")
    else:
        typer.echo(dump_config(cfg), nl=False)


# -------------------------------------------------------------------------------------------- data
@data_app.command("synth")
@user_errors
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder (manifest.csv, images/, dataset.yaml).")],
    seed: Annotated[Optional[int], typer.Option(help="Seed (default: data.synth.seed).")] = None,
    scale: Annotated[Optional[float], typer.Option(help="Scale every class count.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Generate the synthetic ASE-like dataset (printed fields + pink dots), deterministic from a seed."""
    from ase_ray.data.synthetic import generate_synthetic

    extra = [f"data.synth.seed={seed}"] if seed is not None else []
    extra += [f"data.synth.scale={scale}"] if scale is not None else []
    cfg = _config(config, set_, extra)
    df = generate_synthetic(cfg.data.synth, out, progress=True)
    typer.echo(f"wrote {len(df)} images and {out / 'manifest.csv'}")
    typer.echo(df["label"].value_counts().reindex([c.name for c in cfg.data.synth.classes]).to_string())


@import_app.command("csv")
@user_errors
def import_csv_cmd(
    csv: Annotated[Path, typer.Argument(help="CSV with image paths and labels.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    classes: ClassesOpt = None,
    normal_class: Annotated[Optional[str], typer.Option(help="The no-defect class.")] = None,
    path_column: str = "image_path",
    label_column: str = "label",
):
    """Import a CSV of image paths (relative to the CSV) and labels."""
    from ase_ray.data.importers import import_csv

    result = import_csv(csv, out, _split_classes(classes), normal_class, path_column, label_column)
    _report_import(result.manifest_path, result.manifest, result.ignored_files, result.info.classes)


@import_app.command("folder")
@user_errors
def import_folder_cmd(
    root: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    normal_class: Annotated[Optional[str], typer.Option(help="The no-defect class.")] = None,
):
    """Import a folder per class."""
    from ase_ray.data.importers import import_folder

    result = import_folder(root, out, normal_class)
    _report_import(result.manifest_path, result.manifest, result.ignored_files, result.info.classes)


@import_app.command("magnetic-tile")
@user_errors
def import_magnetic_tile_cmd(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    root: Annotated[Optional[Path], typer.Option(help="Dataset root (default: data.magnetic_tile_root).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Import Magnetic-tile: six classes (Free = normal), binary labels, groups by physical tile."""
    from ase_ray.data.magnetic_tile import import_magnetic_tile

    cfg = _config(config, set_)
    df = import_magnetic_tile(root or cfg.data.magnetic_tile_root, out, cfg.data.magnetic_tile_max_gap)
    _report_import(out / "manifest.csv", df, [], sorted(df["label"].unique()))
    typer.echo(f"groups (tiles): {df['group'].nunique()}")


def _report_import(path: Path, df, ignored: list[str], classes: list[str]) -> None:
    from ase_ray.data.validate import validate_manifest

    typer.echo(f"wrote {path} ({len(df)} rows)")
    typer.echo(df["label"].value_counts().to_string())
    if ignored:
        typer.echo(f"ignored {len(ignored)} non-image file(s), e.g. {ignored[:3]}")
    problems = validate_manifest(df, classes)
    if problems:
        _print_problems(problems)
        typer.echo(f"run `ase-ray data validate {path}` after fixing them")
        raise typer.Exit(1)


@data_app.command("validate")
@user_errors
def data_validate(
    manifest: Annotated[Path, typer.Argument(help="Manifest (CSV or Parquet).")],
    classes: ClassesOpt = None,
    images: Annotated[bool, typer.Option(help="Decode every image.")] = True,
):
    """Check a manifest: every bad row is named; exit 1 when any is found."""
    from ase_ray.data.manifest import read_dataset_info, read_manifest
    from ase_ray.data.validate import validate_manifest

    df = read_manifest(manifest)
    info = read_dataset_info(manifest)
    class_list = _split_classes(classes) or (info.classes if info else None)
    if class_list is None:
        typer.echo("note: no class list (dataset.yaml beside the manifest or --classes): labels not checked")
    problems = validate_manifest(df, class_list, check_images=images)
    if problems:
        _print_problems(problems)
        raise typer.Exit(1)
    typer.echo(f"ok: {len(df)} rows, {df['label'].nunique()} classes, no problems")


def _print_problems(problems) -> None:
    for problem in problems:
        typer.echo(str(problem), err=True)
    rows = len({p.row for p in problems})
    typer.secho(f"{len(problems)} problem(s) in {rows} row(s)", err=True, fg=typer.colors.RED)


@data_app.command("split")
@user_errors
def data_split(
    manifest: Annotated[Path, typer.Argument(help="Manifest to split.")],
    out: Annotated[Optional[Path], typer.Option(help="Output manifest (default: overwrite).")] = None,
    folds: Annotated[Optional[int], typer.Option(help="Also write a `fold` column for k-fold CV.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Add a stratified, group-aware train/val/test `split` column (and optionally `fold`)."""
    from ase_ray.data.manifest import read_manifest, write_manifest
    from ase_ray.data.splits import assign_splits, kfold_indices, leaking_groups, split_summary

    from ase_ray.outputs import check_output_file

    from ase_ray.errors import DataError

    if folds is not None and folds < 2:
        raise DataError(f"k-fold needs at least 2 folds, got --folds {folds}")
    cfg = _config(config, set_)
    s = cfg.data.split
    check_output_file(out or manifest, "data split --out")
    df = read_manifest(manifest)
    df = assign_splits(df, s.val_fraction, s.test_fraction, cfg.project.seed, s.label_column)
    if folds:
        df["fold"] = -1
        for k, (_, test_pos) in enumerate(kfold_indices(df, folds, cfg.project.seed, s.label_column)):
            df.iloc[test_pos, df.columns.get_loc("fold")] = k
    assert not leaking_groups(df), "group leak"  # guaranteed by construction
    target = out or manifest
    write_manifest(df, target)
    _copy_dataset_info(manifest, target)
    typer.echo(f"wrote {target}")
    typer.echo(split_summary(df, s.label_column).to_string())


def _copy_dataset_info(src_manifest: Path, dst_manifest: Path) -> None:
    from ase_ray.data.manifest import read_dataset_info, write_dataset_info

    info = read_dataset_info(src_manifest)
    if info is not None and Path(dst_manifest).parent.resolve() != Path(src_manifest).parent.resolve():
        write_dataset_info(Path(dst_manifest).parent, info)


@data_app.command("augment")
@user_errors
def data_augment(
    manifest: Annotated[Path, typer.Argument(help="Manifest with a `split` column.")],
    out: Annotated[Path, typer.Option(help="Output folder for images and the augmented manifest.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """TDA: fit per-class pink-dot Gaussians on the train split and synthesise new training images."""
    from ase_ray.data.manifest import read_dataset_info, read_manifest
    from ase_ray.data.tda import augment_manifest

    cfg = _config(config, set_)
    df = read_manifest(manifest)
    info = read_dataset_info(manifest)
    result = augment_manifest(df, out, cfg.data.tda, info.classes if info else None)
    _copy_dataset_info(manifest, out / "manifest.csv")
    typer.echo(f"wrote {out / 'manifest.csv'} ({len(result.manifest)} rows)")
    for cls, n in result.added.items():
        typer.echo(f"  {cls}: +{n}")
    for cls, why in result.skipped.items():
        typer.echo(f"  {cls}: skipped ({why})")


# ------------------------------------------------------------------------------------------ models
@models_app.command("pull")
@user_errors
def models_pull(
    models_dir: Annotated[Optional[Path], typer.Option(
        help="Folder to download into, shared by every node (default: features.models_dir).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Download every configured hub model (stages with backend instructblip, hf, resnet or bert) at its
    revision into the models folder, in the Hugging Face cache layout; workers then load from it with
    local_files_only (features.models_dir). Needs the hub; the token comes from HF_TOKEN or a stored
    `hf auth login` and is never printed or logged."""
    from ase_ray.features.hub import pull_models

    extra = [f"features.models_dir={models_dir}"] if models_dir is not None else []
    cfg = _config(config, set_, extra)
    pulled = pull_models(cfg.features, echo=typer.echo)
    typer.echo(f"{len(pulled)} model(s) in {cfg.features.models_dir}; workers load them when features.models_dir "
               "names it (configs/cluster.yaml does)")


# ---------------------------------------------------------------------------------------- features
@app.command("features")
@user_errors
def features_cmd(
    manifest: Annotated[Path, typer.Option(help="Manifest to extract features for.")],
    out: Annotated[Optional[str], typer.Option(help="Store folder, a path or a URI such as s3://bucket/store "
                                                   "(default: features.out_dir).")] = None,
    track: Annotated[bool, typer.Option(help="Log an MLflow run.")] = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Extract OCR, VLM, LLM, image and text features on Ray Data into a Parquet store."""
    from ase_ray.features.pipeline import extract_features

    cfg = _config(config, set_)
    result = extract_features(cfg, manifest, out, echo=typer.echo, track=track)
    typer.echo(f"store: {result.out_dir}")


# ------------------------------------------------------------------------------- train / evaluate
@app.command("train")
@user_errors
def train_cmd(
    run: Annotated[Optional[str], typer.Argument(
        help="With --resume: the run to continue (its name or MLflow run id; default: the latest).",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run from its latest checkpoint "
                                         "instead of starting a new one: `--resume [RUN]`.")] = False,
    store: Annotated[Optional[str], typer.Option(help="Feature store, a path or a URI (default: train.store_dir).")] = None,
    corrections: Annotated[bool, typer.Option("--corrections", help="Take the review page's corrections table "
                                              "into the training rows (train.corrections).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Train PFA/CMAF (or a baseline) on Ray Train with DDP or DeepSpeed; log it to MLflow.

    Every invocation is a new run; `--resume [RUN]` continues one with its own settings."""
    from ase_ray.errors import ConfigError
    from ase_ray.train.fit import fit

    if run is not None and not resume:
        raise ConfigError(f"unexpected argument {run!r}: to continue a run, use `ase-ray train --resume {run}`")
    extra = [f"train.store_dir={store}"] if store is not None else []
    extra += ["train.corrections=true"] if corrections else []
    result = fit(_config(config, set_, extra), echo=typer.echo, resume=(run or True) if resume else False)
    typer.echo(f"model: {result.model_dir} (epoch {result.best['epoch']})\nrun: {result.run_id}\n"
               f"train run: {result.train_run}\nresults: {result.results_path}")


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    model: Annotated[str, typer.Option(help="Model folder, runs:/<id>/model or models:/<name>@<alias>.")],
    store: Annotated[Path, typer.Option(help="Feature store to score (ase-ray features).")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Optional[Path], typer.Option(help="Write the metrics JSON here.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Macro-F1, accuracy, per-class scores and the confusion matrix of a model on a split."""
    from ase_ray.outputs import check_output_file
    from ase_ray.train.evaluate import evaluate, evaluation_text, write_evaluation

    if out is not None:
        check_output_file(out, "evaluate --out")
    metrics = evaluate(_config(config, set_), model, store, split)
    typer.echo(evaluation_text(metrics))
    if out is not None:
        typer.echo(f"wrote {write_evaluation(metrics, out)}")


@app.command("ablate")
@user_errors
def ablate_cmd(
    manifest: Annotated[Path, typer.Option(help="Original manifest (with groups; no TDA rows).")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <work_dir>/ablate).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """The paper's ablation (image-only ... full method) with group-aware k-fold CV and seeds."""
    from ase_ray.train.ablate import run_ablation

    cfg = _config(config, set_)
    result = run_ablation(cfg, manifest, out or Path(cfg.project.work_dir) / "ablate", echo=typer.echo)
    typer.echo(f"wrote {result.table_path} and {result.json_path}")


# ---------------------------------------------------------------------------------- tune / register
@app.command("tune")
@user_errors
def tune_cmd(
    space: Annotated[Optional[Path], typer.Option(help="Search space YAML (see tune_spaces/).")] = None,
    store: Annotated[Optional[str], typer.Option(help="Feature store, a path or a URI (default: train.store_dir).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted search (tune.name, else the latest).")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Ray Tune search (ASHA on val macro-F1) over training settings; registers the best model."""
    from ase_ray.tune.search import run_search

    if resume and space is not None:
        typer.echo("note: --space is ignored with --resume: a search keeps the space it started with")
    extra = [f"train.store_dir={store}"] if store is not None else []
    result = run_search(_config(config, set_, extra), None if resume else space, resume=resume, echo=typer.echo)
    typer.echo(f"table: {result.table_path}\nMLflow parent run: {result.parent_run_id}")
    if result.registration is not None:
        typer.echo(f"model: {result.registration.uri}")


@app.command("register")
@user_errors
def register_cmd(
    run_id: Annotated[str, typer.Option(help="MLflow run of a finished training (ase-ray train / a trial).")],
    task: Annotated[Optional[str], typer.Option(help="binary or multiclass (default: the run's).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Store to re-score the champion on when its validation "
                                                       "data differ (default: train.store_dir).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Make it the champion without comparing.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Register a run's model; it becomes @champion only if it beats the champion on the same val data."""
    from ase_ray.registry import register_run

    registration = register_run(_config(config, set_), run_id, task, store, force, echo=typer.echo)
    typer.echo(f"model: {registration.uri}")


# ------------------------------------------------------------------------------- serve / predict
ModelUriOpt = Annotated[
    Optional[str],
    typer.Option("--model-uri", help="models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model "
                 "(default: serve.model_uri, else models:/ase-ray-<train.task>@champion)."),
]


@app.command("serve")
@user_errors
def serve_cmd(
    model_uri: ModelUriOpt = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default: serve.port, 8000).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default: serve.host, 127.0.0.1).")] = None,
    detach: Annotated[bool, typer.Option(help="Deploy on a running cluster (RAY_ADDRESS) and return.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Serve the model over HTTP with Ray Serve (POST /predict, /predict/batch; GET /healthz, /metadata,
    /docs) until Ctrl-C. Set the env var named by serve.api_key_env (ASE_RAY_API_KEY) to require a key."""
    from ase_ray.serve.deploy import run_until_stopped

    extra = [f"serve.model_uri={model_uri}"] if model_uri else []
    extra += [f"serve.port={port}"] if port is not None else []
    extra += [f"serve.host={host}"] if host else []
    run_until_stopped(_config(config, set_, extra), echo=typer.echo, detach=detach)


@app.command("predict")
@user_errors
def predict_cmd(
    manifest: Annotated[Path, typer.Option(help="Manifest of images to classify (image_path; labels optional).")],
    out: Annotated[str, typer.Option(help="Output folder, a path or a URI (s3://...): predictions.parquet, "
                                         "predictions.csv, summary.json.")],
    model_uri: ModelUriOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Classify every image of a manifest as a Ray Data batch job, with the same predictor as Serve."""
    from ase_ray.serve.batch import predict_manifest

    result = predict_manifest(_config(config, set_), manifest, out, model_uri, echo=typer.echo)
    typer.echo(f"wrote {result.out_dir}")


# ---------------------------------------------------------------------------------------- pipeline
@app.command("pipeline")
@user_errors
def pipeline_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="Output folder (default: project.work_dir).")] = None,
):
    """Run the whole workflow on the configured data (default: the synthetic set, locally)."""
    from ase_ray.pipeline import run_pipeline

    extra = [f"project.work_dir={work_dir}"] if work_dir is not None else []
    cfg = _config(config, set_, extra)
    run_pipeline(cfg, echo=typer.echo)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

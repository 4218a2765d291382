"""One export routine for every GraftLM architecture: a Hub-ready folder that loads with trust_remote_code.

The folder holds config.json (with an `auto_map`), the configuration and modeling sources flattened to
single-level relative imports (transformers' dynamic-module loader accepts nothing deeper),
model.safetensors, generation_config.json, the tokenizer(s) and a model card. It is written into a
hidden staging folder beside the target, synced to disk, and swapped into place in one atomic rename
(staged_folder, which the analysis and training checkpoints use too), so the target never holds a
half-written model and a failed or killed write leaves the previous folder as it was.
"""

import contextlib
import ctypes
import errno
import importlib
import inspect
import logging
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from string import Template

from . import registry
from .inputs import check_tokenizer
from .modeling.hf_compat import SUPPORTED_TRANSFORMERS

logger = logging.getLogger(__name__)

_SOURCE_PACKAGES = ("configuration", "modeling")
# `from ..configuration.configuration_dfa import X` or `from .gpt2_layers import X`
_RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)(\.+)([\w.]*)(\s+import\s)", re.MULTILINE)


class ExportError(RuntimeError):
    pass


def check_output_dir(output_dir, overwrite=False, inputs=None):
    """Refuse a non-empty output folder unless `overwrite`, and an output folder that is or holds one of `inputs`
    ({name: path}: replacing it would delete the input); call this before any expensive work."""
    output_dir = Path(output_dir).resolve()
    for name, path in (inputs or {}).items():
        path = Path(path).resolve()
        if path == output_dir or output_dir in path.parents:
            raise ExportError(f"output folder {output_dir} holds the input {name} ({path}): writing there would "
                              "replace the input; choose another output folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"output path {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(f"output folder {output_dir} is not empty; pass --overwrite (overwrite=True) to replace it")


def check_output_args(args):
    """check_output_dir for a command's --output-dir and --overwrite, against every other argument naming a local
    file or folder (the model, base checkpoints, data): no command may write over what it reads."""
    inputs = {name: value for name, value in vars(args).items()
              if name != "output_dir" and isinstance(value, str) and value and os.path.exists(value)}
    check_output_dir(args.output_dir, args.overwrite, inputs)


@contextlib.contextmanager
def staged_folder(output_dir, overwrite=False):
    """Yield an empty hidden folder beside `output_dir` to write into. On success it is synced and replaces
    `output_dir` in one atomic swap; on any failure (full disk included) it is removed and `output_dir` is left as
    it was, and a write error becomes an ExportError saying so."""
    from safetensors import SafetensorError

    output_dir = Path(output_dir).resolve()
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output_dir)
    existed = output_dir.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-{os.getpid()}-", dir=output_dir.parent))
    try:
        yield staging
        _sync_tree(staging)
        _replace_dir(staging, output_dir)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        kept = f"the previous {output_dir} is unchanged" if existed else f"nothing was written to {output_dir}"
        raise ExportError(f"writing {output_dir} failed ({err}); {kept}") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_stale_staging(output_dir):
    """Remove the staging folders that killed writers (whose process is gone) left beside `output_dir`."""
    for stale in output_dir.parent.glob(f".{output_dir.name}.partial-*-*"):
        pid = stale.name[len(output_dir.name) + len(".partial-") + 1 :].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _sync_tree(folder):
    """fsync every file and folder under `folder`, so the swap never publishes data still in the page cache only."""
    for path in [*Path(folder).rglob("*"), Path(folder)]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _flatten_source(path):
    """Return the text of one source file with every relative import rewritten to a single dot."""
    text = Path(path).read_text(encoding="utf-8")
    if re.search(r"^\s*(from|import)\s+graftlm\b", text, re.MULTILINE):
        raise ExportError(f"{path} imports graftlm absolutely; exported sources may only use relative imports")

    def rewrite(match):
        prefix, dots, module, suffix = match.groups()
        parts = module.split(".") if module else []
        if len(dots) == 2 and parts and parts[0] in _SOURCE_PACKAGES:
            parts = parts[1:]
        elif len(dots) != 1:
            raise ExportError(f"{path}: cannot flatten relative import {match.group(0).strip()!r}")
        if len(parts) != 1:
            raise ExportError(f"{path}: relative import {match.group(0).strip()!r} must name one module")
        return f"{prefix}.{parts[0]}{suffix}"

    return _RELATIVE_IMPORT.sub(rewrite, text)


def _resolve_relative(path, dots, module):
    base = Path(path).parent if len(dots) == 1 else Path(path).parent.parent
    return base.joinpath(*module.split(".")).with_suffix(".py")


def collect_sources(*modules):
    """Source files of `modules` and, recursively, of every module they import relatively: {file name: text}."""
    todo = [Path(inspect.getsourcefile(m)) for m in modules]
    sources = {}
    while todo:
        path = todo.pop()
        if path.name in sources:
            continue
        sources[path.name] = _flatten_source(path)
        for _, dots, module, _ in _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8")):
            target = _resolve_relative(path, dots, module)
            if not target.is_file():
                raise ExportError(f"{path}: relative import of {module!r} resolves to no file ({target})")
            todo.append(target)
    return sources


def auto_map_for(model):
    """The config's `auto_map`: AutoConfig plus every Auto class registered for this architecture."""
    arch = registry.get(model.config.model_type)
    config_module = Path(inspect.getsourcefile(type(model.config))).stem
    auto_map = {"AutoConfig": f"{config_module}.{type(model.config).__name__}"}
    for auto_name, model_cls in arch.auto_classes.items():
        auto_map[auto_name] = f"{Path(inspect.getsourcefile(model_cls)).stem}.{model_cls.__name__}"
    return auto_map, [type(model.config), *arch.auto_classes.values()]


def custom_pipeline_modules(config):
    """The modules (in graftlm's modeling package) of the pipelines named by config.custom_pipelines, e.g.
    {"text2text-generation": {"impl": "pipeline_bridge.BridgeText2TextPipeline", ...}}: the export copies them."""
    modules = []
    for task, info in (getattr(config, "custom_pipelines", None) or {}).items():
        module_name, _, class_name = str(info.get("impl", "")).rpartition(".")
        try:
            module = importlib.import_module(f"{__package__}.modeling.{module_name}")
        except ImportError:
            module = None
        if module is None or not hasattr(module, class_name):
            raise ExportError(f"custom pipeline {task!r}: {info.get('impl')!r} is no class in graftlm's modeling package")
        modules.append(module)
    return modules


def _yaml_value(value):
    if isinstance(value, (list, tuple)):
        return "\n" + "\n".join(f"- {v}" for v in value)
    return f" {value}"


def hub_ids(*sources):
    """A card's `base_model`: the Hub ids among the checkpoints a model was made from. A local folder has no Hub id
    (its path names a folder of the machine that converted the model), so it is left out; see source_name."""
    return [str(source) for source in sources if not Path(source).exists()]


def source_name(source):
    """How a card's body names a source checkpoint: its Hub id, or a local folder by its name alone (its path would
    name a folder of the converting machine)."""
    return Path(source).name if Path(source).exists() else str(source)


def render_card(template_name, metadata, fields):
    """Render model_cards/<template_name>.md: YAML metadata from `metadata` (keys whose value is None or empty are
    left out), body with $placeholders from `fields`."""
    metadata = {key: value for key, value in metadata.items() if value not in (None, [], "")}
    if metadata.get("license") == "other" and not {"license_name", "license_link"} <= set(metadata):
        raise ExportError("a model card with `license: other` needs `license_name` and `license_link` (the Hub "
                          "shows them); give a licence identifier instead, e.g. --license mit")
    template = Template(resources.files("graftlm.model_cards").joinpath(f"{template_name}.md").read_text("utf-8"))
    try:
        body = template.substitute({k: str(v) for k, v in fields.items()})
    except KeyError as err:
        raise ExportError(f"model card template {template_name}.md needs the field {err}") from None
    header = "\n".join(f"{key}:{_yaml_value(value)}" for key, value in metadata.items())
    return f"---\n{header}\n---\n\n{body.rstrip()}\n\n{_requirements()}"


def _requirements():
    import torch
    import transformers

    return (
        "## Requirements\n\n"
        f"The model's code (`trust_remote_code=True`) supports transformers {SUPPORTED_TRANSFORMERS}; under a release "
        "outside that range it warns once when loaded, naming the range and the installed version. Exported with "
        f"transformers {transformers.__version__} and torch {torch.__version__.split('+')[0]}.\n"
    )


def export_model(model, output_dir, *, tokenizers=None, card=None, overwrite=False, files=None):
    """Write a Hub-ready folder for any GraftLM model.

    tokenizers: {subfolder: tokenizer}; "" is the root, where AutoTokenizer.from_pretrained(folder) finds it.
    card: (template name, YAML metadata dict, body fields dict), rendered into README.md.
    files: {file name: text} written beside the model (e.g. training metrics).
    """
    output_dir = Path(output_dir).resolve()
    if (tokenizers or {}).get("") is not None:
        check_tokenizer(tokenizers[""], model.config.get_text_config(decoder=True).vocab_size, "the tokenizer")
    auto_map, classes = auto_map_for(model)
    sources = collect_sources(*[inspect.getmodule(cls) for cls in classes], *custom_pipeline_modules(model.config))
    texts = {**sources, **(files or {})}
    if card is not None:
        texts["README.md"] = render_card(*card)

    with staged_folder(output_dir, overwrite) as staging:
        # Saved with the export only: the Auto classes, and the transformers range the exported code supports.
        extra = {"auto_map": auto_map, "graftlm_supported_transformers": SUPPORTED_TRANSFORMERS}
        previous = {key: getattr(model.config, key, None) for key in extra}
        for key, value in extra.items():
            setattr(model.config, key, value)
        try:
            model.save_pretrained(staging, safe_serialization=True)
        finally:
            for key, value in previous.items():
                setattr(model.config, key, value)
        for subfolder, tokenizer in (tokenizers or {}).items():
            tokenizer.save_pretrained(staging / subfolder)
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
    logger.info("exported %s to %s", type(model).__name__, output_dir)
    return output_dir


def _replace_dir(staging, output_dir):
    """Move `staging` to `output_dir`. An old folder is swapped with it in one atomic rename where the system can
    (Linux renameat2 RENAME_EXCHANGE), else moved aside first; either way it is removed only once the new one is in
    place."""
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    if _exchange(staging, output_dir):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old folder
        return
    backup = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
    os.replace(output_dir, backup)
    try:
        os.replace(staging, output_dir)
    except BaseException:
        os.replace(backup, output_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _exchange(a, b):
    """Swap two paths atomically; False where the C library or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def add_hub_arguments(parser):
    """The upload options of every command that exports a model (convert, train)."""
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the export to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", help="Hub token (default: the cached login or HF_TOKEN)")
    parser.add_argument("--commit-message", help="commit message of the upload")


def push_from_args(folder, args):
    """Upload `folder` if the command was given --push-to-hub (add_hub_arguments)."""
    if args.push_to_hub:
        push_to_hub(folder, args.push_to_hub, private=args.private, token=args.token, commit_message=args.commit_message)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")


def push_to_hub(folder, repo_id, *, private=False, token=None, commit_message=None):
    """Create `repo_id` if needed and upload `folder` in one commit. The local folder is left as it is."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    message = commit_message or f"Upload {Path(folder).name} exported with graftlm"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message, repo_type="model")
    except Exception as err:  # network, auth or Hub-side failure: the local export is complete either way
        raise ExportError(
            f"upload of {folder} to the Hub repo {repo_id!r} failed ({type(err).__name__}: {err}); "
            f"the local export at {folder} is complete"
        ) from err
    logger.info("uploaded %s to %s", folder, repo_id)
    return commit

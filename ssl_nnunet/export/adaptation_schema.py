"""The nnssl adaptation plan (``nnssl_adaptation_plan``): its fields, a strict checker and checkpoint hygiene.

The schema is that of nnssl's dataclasses (``nnssl.adaptation_planning.adaptation_plan.AdaptationPlan``,
``ArchitecturePlans``, ``DynamicArchitecturePlans`` and ``nnssl.experiment_planning.experiment_planners.plan.Plan``,
``ConfigurationPlan``) in their serialised (JSON) form; ``documentation/export.md`` lists the same fields. nnssl
itself is not needed: the checker compares field names and JSON types, and the state-dict keys the plan points to.

nnssl's ``DynamicArchitecturePlans`` describes a ``ResidualEncoderUNet`` (``n_blocks_per_stage``). A
``PlainConvUNet`` has ``n_conv_per_stage`` instead; nnssl's ``from_dict`` rejects such kwargs, while nnU-Net
master's ``nnUNetv2_preprocess_like_nnssl`` copies them into its plans unchanged. The checker accepts exactly that
one substitution for ``PlainConvUNet``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from ssl_nnunet.utilities.errors import SSLInputError

# field -> JSON type (see _TYPE_CHECKS); order as in nnssl's dataclasses
ADAPTATION_PLAN_FIELDS: Dict[str, str] = {
    "architecture_plans": "dict",
    "pretrain_plan": "dict",
    "pretrain_num_input_channels": "int",
    "recommended_downstream_patchsize": "list[int]",
    "key_to_encoder": "str",
    "key_to_stem": "str",
    "keys_to_in_proj": "list[str]",
    "key_to_lpe": "str|None",
}
ARCHITECTURE_PLANS_FIELDS: Dict[str, str] = {
    "arch_class_name": "str",
    "arch_kwargs": "dict|None",
    "arch_kwargs_requiring_import": "list[str]|None",
}
DYNAMIC_ARCH_KWARGS_FIELDS: Dict[str, str] = {
    "n_stages": "int",
    "features_per_stage": "list[int]",
    "conv_op": "str",
    "kernel_sizes": "list[list[int]]",
    "strides": "list[list[int]]",
    "n_blocks_per_stage": "int|list[int]",
    "n_conv_per_stage_decoder": "int|list[int]",
    "conv_bias": "bool",
    "norm_op": "str",
    "norm_op_kwargs": "dict",
    "dropout_op": "str|None",
    "dropout_op_kwargs": "dict|None",
    "nonlin": "str",
    "nonlin_kwargs": "dict",
}
PLAN_FIELDS: Dict[str, str] = {
    "dataset_name": "str",
    "plans_name": "str",
    "original_median_spacing_after_transp": "list[float]",
    "image_reader_writer": "str",
    "transpose_forward": "list[int]",
    "transpose_backward": "list[int]",
    "configurations": "dict",
    "experiment_planner_used": "str",
}
CONFIGURATION_PLAN_FIELDS: Dict[str, str] = {
    "data_identifier": "str",
    "preprocessor_name": "str",
    "spacing_style": "str",
    "normalization_schemes": "list[str]",
    "use_mask_for_norm": "list[bool]",
    "resampling_fn_data": "str",
    "resampling_fn_data_kwargs": "dict",
    "resampling_fn_mask": "str",
    "resampling_fn_mask_kwargs": "dict",
    "spacing": "list[float]|None",
    "patch_size": "list[int]",
}
SPACING_STYLES = ("onemmiso", "median", "noresample")
# nnssl's ARCHITECTURE_PRESETS; the last two are the dynamic ones that carry arch_kwargs
ARCHITECTURE_NAMES = ("ResEncL", "NoSkipResEncL", "PrimusS", "PrimusB", "PrimusM", "PrimusL",
                      "ResidualEncoderUNet", "PlainConvUNet")
DYNAMIC_ARCHITECTURES = ("ResidualEncoderUNet", "PlainConvUNet")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_list_of(v: Any, check) -> bool:
    return isinstance(v, list) and all(check(x) for x in v)


_TYPE_CHECKS = {
    "int": _is_int,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
    "None": lambda v: v is None,
    "list[int]": lambda v: _is_list_of(v, _is_int),
    "list[float]": lambda v: _is_list_of(v, lambda x: _is_int(x) or isinstance(x, float)),
    "list[str]": lambda v: _is_list_of(v, lambda x: isinstance(x, str)),
    "list[bool]": lambda v: _is_list_of(v, lambda x: isinstance(x, bool)),
    "list[list[int]]": lambda v: _is_list_of(v, lambda x: _is_list_of(x, _is_int)),
}


def has_type(value: Any, kind: str) -> bool:
    """``kind`` is one of the type strings of the field tables, alternatives separated by ``|``."""
    return any(_TYPE_CHECKS[k](value) for k in kind.split("|"))


def _check_fields(obj: Any, fields: Mapping[str, str], where: str, exact: bool,
                  optional: Sequence[str] = ()) -> List[str]:
    if not isinstance(obj, dict):
        return [f"{where} is {type(obj).__name__}, expected a dict"]
    problems = []
    for name, kind in fields.items():
        if name not in obj:
            if name not in optional:
                problems.append(f"{where} lacks '{name}'")
        elif not has_type(obj[name], kind):
            problems.append(f"{where}.{name} = {obj[name]!r} is not {kind}")
    if exact:
        problems += [f"{where} has '{k}', which is not in nnssl's schema" for k in obj if k not in fields]
    return problems


def arch_kwargs_fields(arch_class_name: str) -> Dict[str, str]:
    """nnssl's ``DynamicArchitecturePlans`` fields; for ``PlainConvUNet`` with ``n_conv_per_stage`` in place of
    ``n_blocks_per_stage`` (outside nnssl's dataclass, see the module docstring)."""
    if arch_class_name != "PlainConvUNet":
        return dict(DYNAMIC_ARCH_KWARGS_FIELDS)
    return {("n_conv_per_stage" if k == "n_blocks_per_stage" else k): v for k, v in DYNAMIC_ARCH_KWARGS_FIELDS.items()}


def _is_module_prefix(prefix: str, keys: Sequence[str]) -> bool:
    return any(k.startswith(prefix + ".") for k in keys)


def adaptation_plan_problems(plan: Any, state_dict: Optional[Mapping[str, Any]] = None,
                             exact: bool = True) -> List[str]:
    """Everything in ``plan`` that differs from nnssl's serialised schema (empty list: none).

    ``exact``: also report keys outside the schema (what the exporter must never write). With ``exact=False``
    (reading foreign plans) extra keys are allowed and ``key_to_lpe`` may be absent, as nnssl's ``from_dict``
    allows. With ``state_dict``, ``key_to_encoder``/``key_to_stem`` must be module prefixes of its keys,
    every ``keys_to_in_proj`` entry must have a ``.weight`` and ``key_to_lpe`` (if set) must be a key.
    """
    problems = _check_fields(plan, ADAPTATION_PLAN_FIELDS, "adaptation plan", exact,
                             optional=() if exact else ("key_to_lpe",))
    if not isinstance(plan, dict):
        return problems
    arch = plan.get("architecture_plans")
    if isinstance(arch, dict):
        problems += _check_fields(arch, ARCHITECTURE_PLANS_FIELDS, "architecture_plans", exact,
                                  optional=() if exact else ("arch_kwargs_requiring_import",))
        name = arch.get("arch_class_name")
        if isinstance(name, str) and name not in ARCHITECTURE_NAMES:
            problems.append(f"architecture_plans.arch_class_name '{name}' is not one of nnssl's "
                            f"{', '.join(ARCHITECTURE_NAMES)}")
        if isinstance(arch.get("arch_kwargs"), dict) and not str(name).startswith("Primus"):
            # a Primus plan's own sizes (CPU profiles) are Primus kwargs, not DynamicArchitecturePlans
            problems += _check_fields(arch["arch_kwargs"], arch_kwargs_fields(name), "architecture_plans.arch_kwargs",
                                      exact, optional=("dropout_op", "dropout_op_kwargs"))
    pretrain = plan.get("pretrain_plan")
    if isinstance(pretrain, dict):
        problems += _check_fields(pretrain, PLAN_FIELDS, "pretrain_plan", exact)
        configs = pretrain.get("configurations")
        if isinstance(configs, dict):
            if not configs:
                problems.append("pretrain_plan.configurations is empty")
            for cname, cfg in configs.items():
                where = f"pretrain_plan.configurations.{cname}"
                problems += _check_fields(cfg, CONFIGURATION_PLAN_FIELDS, where, exact)
                if isinstance(cfg, dict) and cfg.get("spacing_style") not in SPACING_STYLES:
                    problems.append(f"{where}.spacing_style {cfg.get('spacing_style')!r} is not one of "
                                    f"{', '.join(SPACING_STYLES)}")
    if state_dict is not None:
        keys = list(state_dict)
        for field in ("key_to_encoder", "key_to_stem"):
            prefix = plan.get(field)
            if isinstance(prefix, str) and not _is_module_prefix(prefix, keys):
                problems.append(f"{field} '{prefix}' is not a module of the state dict (no key starts with "
                                f"'{prefix}.')")
        for key in plan.get("keys_to_in_proj") or []:
            if isinstance(key, str) and key + ".weight" not in state_dict:
                problems.append(f"keys_to_in_proj entry '{key}' has no '{key}.weight' in the state dict")
        lpe = plan.get("key_to_lpe")
        if isinstance(lpe, str) and lpe not in state_dict:
            problems.append(f"key_to_lpe '{lpe}' is not a key of the state dict")
    return problems


def require_valid_adaptation_plan(plan: Any, source: str, state_dict: Optional[Mapping[str, Any]] = None,
                                  exact: bool = False) -> None:
    """Raise :class:`SSLInputError` naming ``source`` and every problem of :func:`adaptation_plan_problems`."""
    problems = adaptation_plan_problems(plan, state_dict, exact)
    if problems:
        raise SSLInputError(f"The nnssl adaptation plan in {source} does not follow nnssl's schema: "
                            + "; ".join(problems[:12]) + (f" ... ({len(problems)} problems)" if len(problems) > 12
                                                          else "") + ".")


def to_weights_only_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``torch.load(..., weights_only=True)`` accepts: numpy scalars/arrays become Python
    numbers/lists, tuples stay tuples, tensors, ``torch.device`` and plain types pass through."""
    import numpy as np
    if isinstance(obj, dict):
        return {k: to_weights_only_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_weights_only_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_weights_only_safe(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj

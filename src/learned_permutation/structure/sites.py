"""Permutation sites: the places in a decoder where a channel permutation folds into the weights.

Three kinds:
- `residual`: the hidden state, one site for the whole model;
- `mlp`: the intermediate activation of each layer (gate/up rows -> down_proj columns);
- `attn_vo`: each layer's attention output, permuted within each KV head (v_proj rows ->
  o_proj columns of every query head that reads that KV head).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from learned_permutation.math.objectives import Consumer
from learned_permutation.structure.offload import read_parameter, stored_tensor
from learned_permutation.structure.registry import ArchitectureMapping, AttentionShape, mapping_for, mapping_for_config

SiteKind = Literal["residual", "mlp", "attn_vo"]
SITE_KINDS: tuple[SiteKind, ...] = ("residual", "mlp", "attn_vo")
RESIDUAL_SITE_NAME = "residual"


class SiteNotFoldableError(ValueError):
    """A site's channels cannot be grouped into whole N:M groups."""


@dataclass(frozen=True)
class NamedModule:
    """A module together with its dotted name in the model."""

    name: str
    module: torch.nn.Module = field(repr=False)


@dataclass(frozen=True, eq=False)
class PermutationSite:
    """One foldable channel space and every module that carries it.

    `producers` emit the channels (Linear rows and biases; Embedding columns), `consumer_modules`
    read them (Linear input columns), `norms` scale them elementwise (weight and bias).
    `block_size` restricts permutations to contiguous blocks (head_dim for attn_vo).
    For attn_vo, the site's channels are v_proj's output rows; o_proj has `query_groups`
    replicas of them, one per query head sharing a KV head.
    """

    name: str
    kind: SiteKind
    layer_index: int | None
    size: int
    block_size: int | None
    producers: tuple[NamedModule, ...]
    consumer_modules: tuple[NamedModule, ...]
    norms: tuple[NamedModule, ...]
    query_groups: int = 1

    def consumer_column_index(self, perm: torch.Tensor) -> torch.Tensor:
        """Index over consumer input columns that applies `perm` (over site channels) to every replica."""
        if self.query_groups == 1:
            return perm
        block = self.block_size
        num_blocks = self.size // block
        block_starts = torch.arange(num_blocks, device=perm.device)[:, None] * block
        offsets_in_block = perm.reshape(num_blocks, block) - block_starts
        per_query_head = offsets_in_block.repeat_interleave(self.query_groups, dim=0)
        query_starts = torch.arange(num_blocks * self.query_groups, device=perm.device)[:, None] * block
        return (per_query_head + query_starts).flatten()

    def replica_columns(self) -> list[torch.Tensor | None]:
        """Consumer input columns of each replica, in site channel order (None: all columns, as is).

        Replica r of an attn_vo site is o_proj's column block of query head kv * query_groups + r
        for every KV head kv.
        """
        if self.query_groups == 1:
            return [None]
        block = self.block_size
        kv_heads = torch.arange(self.size // block)[:, None]
        within_head = torch.arange(block)
        return [
            ((kv_heads * self.query_groups + replica) * block + within_head).flatten()
            for replica in range(self.query_groups)
        ]

    def consumers_from_stats(
        self,
        stats: Mapping[torch.nn.Module | str, torch.Tensor],
        device: torch.device | str | None = None,
    ) -> list[Consumer]:
        """The solver's view of this site: one Consumer per consumer module found in `stats`.

        `stats` maps a consumer module (or its name) to either the Hessian `X^T X` over its
        input columns ([in, in]) or the diagonal `act_sq` ([in]). Modules absent from `stats`
        are skipped (the pruner does not target them). Under GQA each replica of an attn_vo
        site becomes its own Consumer with the matching diagonal block of the Hessian; the
        off-diagonal blocks between replicas (the correlation between outputs of different query
        heads reading one KV head) are dropped, so the summed objective is a block-diagonal
        approximation of o_proj's (and a SparseGPT score inverts each replica's block, not the
        whole Hessian). With MHA, for mlp and residual, nothing is dropped.

        Weights are read offload-safely onto `device` (default: each module's execution device);
        the residual site spans every layer, so pass the offload device (e.g. "cpu") there to
        avoid onloading the whole model at once.
        """
        consumers = []
        for named in self.consumer_modules:
            stat = _lookup_stat(stats, named)
            if stat is None:
                continue
            weight = read_parameter(named.module, "weight", device)
            stat = _checked_stat(self, named, stat, weight.shape[1]).to(weight.device)
            for columns in self.replica_columns():
                consumers.append(_replica_consumer(weight, stat, columns))
        return consumers


def _lookup_stat(stats: Mapping, named: NamedModule) -> torch.Tensor | None:
    stat = stats.get(named.module)
    return stats.get(named.name) if stat is None else stat


def _checked_stat(site: PermutationSite, named: NamedModule, stat: torch.Tensor, in_features: int) -> torch.Tensor:
    expected = {1: (in_features,), 2: (in_features, in_features)}.get(stat.dim())
    if tuple(stat.shape) != expected:
        raise ValueError(
            f"site {site.name}: statistic for {named.name} has shape {tuple(stat.shape)}; expected a "
            f"Hessian ({in_features}, {in_features}) or a diagonal act_sq ({in_features},)."
        )
    return stat


def _replica_consumer(weight: torch.Tensor, stat: torch.Tensor, columns: torch.Tensor | None) -> Consumer:
    if columns is not None:
        columns = columns.to(weight.device)
        weight = weight.index_select(1, columns)
        stat = stat.index_select(0, columns)
        if stat.dim() == 2:
            stat = stat.index_select(1, columns)
    if stat.dim() == 2:
        return Consumer(weight, hessian=stat)
    return Consumer(weight, act_sq=stat)


def find_sites(model: torch.nn.Module, m: int, kinds: Iterable[SiteKind] = SITE_KINDS) -> list[PermutationSite]:
    """All sites of `kinds` in `model`, checked to be foldable into whole groups of `m` channels.

    Order: the residual site first, then per layer attn_vo before mlp (execution order).
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = set(kinds) - set(SITE_KINDS)
    if unknown:
        raise ValueError(f"unknown site kinds {sorted(unknown)}; choose from {list(SITE_KINDS)}")
    mapping = mapping_for(model)
    attention = mapping.attention_shape(model.config)
    layers = model.get_submodule(mapping.decoder_layers)
    sites = []
    if "residual" in kinds:
        sites.append(_residual_site(model, mapping, len(layers)))
    for index in range(len(layers)):
        if "attn_vo" in kinds:
            sites.append(_attention_site(model, mapping, attention, index))
        if "mlp" in kinds:
            sites.append(_mlp_site(model, mapping, index))
    for site in sites:
        _check_shapes(site)
        _check_foldable(site, m)
    return sites


def _named(model: torch.nn.Module, name: str) -> NamedModule:
    return NamedModule(name, model.get_submodule(name))


def _in_layer(mapping: ArchitectureMapping, index: int, path: str) -> str:
    return f"{mapping.decoder_layers}.{index}.{path}"


def _residual_site(model: torch.nn.Module, mapping: ArchitectureMapping, num_layers: int) -> PermutationSite:
    def every_layer(paths: tuple[str, ...]) -> tuple[NamedModule, ...]:
        return tuple(_named(model, _in_layer(mapping, i, p)) for i in range(num_layers) for p in paths)

    embed = _named(model, mapping.embed_tokens)
    return PermutationSite(
        name=RESIDUAL_SITE_NAME,
        kind="residual",
        layer_index=None,
        size=model.config.hidden_size,
        block_size=None,
        producers=(embed, *every_layer(mapping.residual_writers)),
        consumer_modules=(*every_layer(mapping.residual_readers), _named(model, mapping.lm_head)),
        norms=(*every_layer(mapping.residual_norms), _named(model, mapping.final_norm)),
    )


def _attention_site(
    model: torch.nn.Module, mapping: ArchitectureMapping, attention: AttentionShape, index: int
) -> PermutationSite:
    value_proj = _named(model, _in_layer(mapping, index, mapping.value_proj))
    return PermutationSite(
        name=value_proj.name.rsplit(".", 1)[0],
        kind="attn_vo",
        layer_index=index,
        size=attention.num_kv_heads * attention.head_dim,
        block_size=attention.head_dim,
        producers=(value_proj,),
        consumer_modules=(_named(model, _in_layer(mapping, index, mapping.attention_output_proj)),),
        norms=(),
        query_groups=attention.query_groups,
    )


def _mlp_site(model: torch.nn.Module, mapping: ArchitectureMapping, index: int) -> PermutationSite:
    consumer = _named(model, _in_layer(mapping, index, mapping.mlp_consumer))
    return PermutationSite(
        name=consumer.name.rsplit(".", 1)[0],
        kind="mlp",
        layer_index=index,
        size=consumer.module.in_features,
        block_size=None,
        producers=tuple(_named(model, _in_layer(mapping, index, p)) for p in mapping.mlp_producers),
        consumer_modules=(consumer,),
        norms=(),
    )


def _channel_count(named: NamedModule, role: str) -> int:
    """Channels `named` carries in its role: output features of producers, input of consumers."""
    module = named.module
    if isinstance(module, torch.nn.Embedding):
        return module.embedding_dim
    if isinstance(module, torch.nn.Linear):
        return module.out_features if role == "producer" else module.in_features
    if role == "norm":
        return stored_tensor(module, "weight").numel()
    raise TypeError(f"{named.name} is a {type(module).__name__}; a {role} must be a Linear or Embedding.")


def _check_shapes(site: PermutationSite) -> None:
    """Fail early when the mapping or config disagree with the actual modules."""
    expected = {"producer": site.size, "consumer": site.size * site.query_groups, "norm": site.size}
    for role, modules in (("producer", site.producers), ("consumer", site.consumer_modules), ("norm", site.norms)):
        for named in modules:
            found = _channel_count(named, role)
            if found != expected[role]:
                raise ValueError(
                    f"site {site.name}: {role} {named.name} carries {found} channels, expected "
                    f"{expected[role]}; the architecture mapping or config does not match this model."
                )


def _check_foldable(site: PermutationSite, m: int) -> None:
    check_foldable(site.name, site.kind, site.size, site.block_size, m)


def check_foldable_config(config, m: int, kinds: Iterable[SiteKind] = SITE_KINDS) -> None:
    """`find_sites`' architecture and divisibility checks from a config alone, before the weights load.
    Per-layer sites are named with ``*`` for the layer index (every layer has the same shape)."""
    mapping = mapping_for_config(config)
    attention = mapping.attention_shape(config)
    layer = f"{mapping.decoder_layers}.*"
    shapes = {
        "residual": (RESIDUAL_SITE_NAME, config.hidden_size, None),
        "attn_vo": (f"{layer}.{mapping.value_proj.rsplit('.', 1)[0]}", attention.num_kv_heads * attention.head_dim,
                    attention.head_dim),
        "mlp": (f"{layer}.{mapping.mlp_consumer.rsplit('.', 1)[0]}", config.intermediate_size, None),
    }
    for kind in kinds:
        name, size, block_size = shapes[kind]
        check_foldable(name, kind, size, block_size, m)


def check_foldable(name: str, kind: str, size: int, block_size: int | None, m: int) -> None:
    if size % m:
        raise SiteNotFoldableError(
            f"site {name} ({kind}) has {size} channels, not a multiple of M={m}: "
            f"its consumers cannot be split into whole groups of {m}. Leave '{kind}' out of the "
            "permutation sites or choose an M that divides it."
        )
    if block_size is not None and block_size % m:
        raise SiteNotFoldableError(
            f"site {name} ({kind}) permutes within heads of head_dim={block_size}, "
            f"not a multiple of M={m}: groups of {m} would straddle heads. Leave '{kind}' out of "
            "the permutation sites or choose an M that divides head_dim."
        )

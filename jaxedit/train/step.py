"""The train step: ONE jitted function with explicit in/out shardings and a donated state.

State (a plain dict, what Orbax stores): {"step": int32 [], "params": float32 master weights,
"opt_state": optax state, "ema": EMA params (only with ema_decay)}. Parameters, optimizer
moments and EMA are sharded by the logical rules of `jaxedit.parallel.sharding` (the same layout
as the parameters); the batch is sharded on `act_batch` along its micro-batch axis.

With a `LoraConfig` only LoRA adapters train (`jaxedit.train.lora`): the state holds
{"step", "base": frozen float32 params (sharded like params), "lora": adapters, "opt_state" and
"ema" over the adapters (small, replicated)}; the loss runs the model on merge(base, lora) and
is differentiated with respect to lora only.

A batch is a dict of arrays with a leading gradient-accumulation axis:
  target [A, b, h, w, C], reference [A, b, rh, rw, C] (VAE latents, NHWC),
  and the text conditioning of the model's family (`jaxedit.families`: `Family.train_batch_keys`):
  FLUX.1 Kontext's txt [A, b, Lt, D_txt], y [A, b, D_y]; Step1X-Edit's (a Trainer built with `connector`)
  txt [A, b, L, D_qwen] and txt_mask [A, b, L], plus empty_txt / empty_mask (each item's empty prompt)
  when prompt dropout is on; Qwen-Image-Edit's the same arrays (a Trainer built with a `QwenImageConfig`);
  several references: reference_1, reference_2, ... too.
The step scans over the A micro-batches (summing gradients), then applies one update.
Randomness of step s, micro-batch i: fold_in(fold_in(key, s), i); a run restored at step s
draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxedit import families
from jaxedit.configs import ConnectorConfig, FluxConfig
from jaxedit.parallel import sharding as sh
from jaxedit.parallel.distributed import put_global
from jaxedit.train.lora import LoraConfig, init_lora, merge
from jaxedit.train.objective import ObjectiveConfig, flow_matching_loss
from jaxedit.train.optim import OptimConfig, learning_rate, make_optimizer

State = dict[str, Any]


class Trainer:
    """Builds the model, optimizer, sharded state and the jitted train step for one mesh."""

    def __init__(
        self,
        flux_cfg: FluxConfig,
        objective: ObjectiveConfig,
        optim: OptimConfig,
        total_steps: int,
        mesh: jax.sharding.Mesh,
        *,
        dtype: Any = jnp.bfloat16,
        remat_policy: str = "none",
        mlp_chunks: int = 1,
        scan_layers: bool = True,
        attention_impl: str = "auto",
        rules: sh.Rules = sh.DEFAULT_RULES,
        lora: LoraConfig | None = None,
        connector: ConnectorConfig | None = None,
    ):
        """The model's family is the one whose transformer is built from flux_cfg and the further configs given
        (`families.transformer_preset`): connector: Step1X-Edit's (the model is then `Step1XEdit`, fed Qwen
        states and masks); none: FLUX.1 Kontext's `Flux`."""
        self.cfg, self.objective, self.optim, self.mesh, self.rules = flux_cfg, objective, optim, mesh, rules
        self.preset = families.transformer_preset(flux_cfg, connector=connector)  # the transformer's configs
        self.family = families.of(self.preset)
        self.family.check_objective(objective)
        self.lora = lora
        self.lora_targets = self.family.lora_targets() if lora is not None else {}  # the family's adapter places
        if lora is not None:
            if not self.lora_targets:
                raise ValueError(f"{self.family.title} models train no LoRA adapters: train them fully")
            lora.names(self.lora_targets)  # ValueError for targets the model has not
        self.trained = "params" if lora is None else "lora"  # the state entry the optimizer updates
        kw = dict(
            dtype=dtype,
            param_dtype=jnp.float32,
            scan_layers=scan_layers,
            remat_policy=remat_policy,
            mlp_chunks=mlp_chunks,
        )
        self.model = self.family.module(self.preset, "transformer", attention_impl=attention_impl, **kw)
        boxed = self.family.abstract_params(self.preset, "transformer", jnp.float32, boxed=True)
        self.batch_keys = self.family.train_batch_keys(objective)
        self.conditioning = self.family.conditioning()  # the loss's text arrays and model call
        self.tx = make_optimizer(optim, total_steps)
        self.lr_schedule = learning_rate(optim, total_steps)
        self.param_shardings = sh.shardings(boxed, mesh, rules)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        abstract = jax.eval_shape(self._state_from_params, sh.unbox(boxed), jax.random.key(0))
        self.state_shardings = self._shardings_like_params(abstract)
        self.abstract_state = jax.tree.map(
            lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd), abstract, self.state_shardings
        )
        self._init = jax.jit(
            self._state_from_params,
            in_shardings=(self.param_shardings, self.replicated),
            out_shardings=self.state_shardings,
        )
        self._step = jax.jit(
            self._step_impl,
            in_shardings=(self.state_shardings, self.batch_sharding(), self.replicated, self.replicated),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        if lora is not None:
            self._merge = jax.jit(self.merged, out_shardings=self.param_shardings)

    # ------------------------------------------------------------------------------
    def batch_sharding(self) -> NamedSharding:
        """Of every [A, b, ...] batch array: micro-batch axis b on the batch mesh axes (act_batch)."""
        spec = sh.batch_sharding(self.mesh, 1, self.rules).spec
        return NamedSharding(self.mesh, PartitionSpec(None, *spec))

    def batch_shardings(self, batch: dict | None = None) -> dict[str, NamedSharding]:
        """The sharding of each array the step takes from `batch` (None: a batch of one reference): the
        `batch_keys` and any further references (reference_1, ...)."""
        more = sorted(k for k in batch or () if k.startswith("reference_"))
        return {k: self.batch_sharding() for k in (*self.batch_keys, *more)}

    def _shardings_like_params(self, tree):
        """Param shardings on every subtree shaped like the parameters, replicated elsewhere."""
        ptree = jax.tree.structure(self.param_shardings)
        like = lambda x: jax.tree.structure(x) == ptree  # noqa: E731
        return jax.tree.map(lambda x: self.param_shardings if like(x) else self.replicated, tree, is_leaf=like)

    def _state_from_params(self, params, key) -> State:
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        state = {"step": jnp.zeros((), jnp.int32)}
        if self.lora is None:
            trained = state["params"] = params
        else:
            state["base"] = params
            trained = state["lora"] = init_lora(params, self.lora, key, self.lora_targets)
        state["opt_state"] = self.tx.init(trained)
        if self.optim.ema_decay is not None:
            state["ema"] = jax.tree.map(jnp.copy, trained)
        return state

    def init_state(self, params, key: jax.Array | None = None) -> State:
        """Sharded train state from (host or device) parameters; `key` draws the LoRA `a` factors."""
        params = put_global(params, self.param_shardings)
        key = jax.random.key(0) if key is None else key
        with sh.activate(self.mesh, self.rules):
            return self._init(params, key)

    def model_params(self, state: State, ema: bool = False):
        """The model's parameters in `state` (sharded like params): params, or merge(base, lora); the
        EMA's with ema=True."""
        trained = state["ema" if ema else self.trained]
        if self.lora is None:
            return trained
        with sh.activate(self.mesh, self.rules):
            return self._merge(state["base"], trained)

    def merged(self, base, lora):
        """merge(base, lora), each merged kernel laid out (and so computed) like the parameter."""
        return jax.lax.with_sharding_constraint(merge(base, lora, self.lora, self.lora_targets), self.param_shardings)

    # ------------------------------------------------------------------------------
    def apply(self, params, img, img_ids, *args):
        """The model's call; args as the family's conditioning passes them (Flux: (txt, txt_ids, t, y, guidance),
        guidance dropped without guidance embedding; Step1X-Edit: (txt, txt_mask, t in [0, 1]); Qwen-Image: img_ids
        its static img_shapes, then (txt, txt_mask, t in [0, 1])), in the order the model takes them."""
        return self.model.apply({"params": params}, *self.family.train_inputs(self.preset, img, img_ids, args))

    def loss(self, params, batch: dict[str, jax.Array], key: jax.Array, empty=None):
        """Loss of one micro-batch (dict of [b, ...] arrays) -> (loss, metrics)."""
        return flow_matching_loss(self.objective, self.apply, params, batch, key, empty, self.conditioning)

    def _trained_loss(self, trained, base, batch, key, empty):
        """Loss as a function of what trains: params, or the LoRA adapters over the frozen base."""
        return self.loss(trained if self.lora is None else self.merged(base, trained), batch, key, empty)

    def _step_impl(self, state: State, batch: dict[str, jax.Array], key: jax.Array, empty):
        step_key = jax.random.fold_in(key, state["step"])
        n_micro = batch["target"].shape[0]
        grad_fn = jax.value_and_grad(self._trained_loss, has_aux=True)
        trained, base = state[self.trained], state.get("base")

        def micro(carry, xs):
            i, mb = xs
            (_, metrics), grads = grad_fn(trained, base, mb, jax.random.fold_in(step_key, i), empty)
            carry = jax.tree.map(jnp.add, carry, (grads, metrics))
            return carry, None

        zeros = jax.tree.map(jnp.zeros_like, trained)
        m0 = {"loss": jnp.zeros(()), "mse": jnp.zeros(()), "t_mean": jnp.zeros(())}
        (grads, metrics), _ = jax.lax.scan(micro, (zeros, m0), (jnp.arange(n_micro), batch))
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        metrics = jax.tree.map(lambda m: m / n_micro, metrics)
        updates, opt_state = self.tx.update(grads, state["opt_state"], trained)
        params = optax.apply_updates(trained, updates)
        new = {"step": state["step"] + 1, self.trained: params, "opt_state": opt_state}
        if base is not None:
            new["base"] = base
        if "ema" in state:
            d = self.optim.ema_decay
            new["ema"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
        metrics |= {"grad_norm": optax.global_norm(grads), "lr": self.lr_schedule(state["step"])}
        return new, metrics

    def lower(self, batch: dict[str, jax.ShapeDtypeStruct], empty=None) -> jax.stages.Lowered:
        """The train step lowered on abstract inputs (the state as `abstract_state`, the batch [A, b, ...]
        shapes): `.compile()` it for the mesh's devices ahead of time (e.g. TPU chips from a CPU host)."""
        shardings = self.batch_shardings(batch)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}
        key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=self.replicated)
        if empty is not None:
            empty = tuple(jax.ShapeDtypeStruct(e.shape, e.dtype, sharding=self.replicated) for e in empty)
        with sh.activate(self.mesh, self.rules):
            return self._step.lower(self.abstract_state, batch, key, empty)

    def step(self, state: State, batch: dict[str, Any], key: jax.Array, empty=None) -> tuple[State, dict]:
        """One optimizer step (state is donated). batch: host or device arrays [A, b, ...]."""
        batch = {k: _global(batch[k], s) for k, s in self.batch_shardings(batch).items()}
        with sh.activate(self.mesh, self.rules):
            return self._step(state, batch, key, empty)


def _global(x, sharding: NamedSharding) -> jax.Array:
    """A global array from this process's part of the batch (the whole batch on one host)."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)

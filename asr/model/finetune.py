"""What of the network trains (`model.finetune`, conf/finetune/): every weight (full), HF's MMS attention adapters
(adapters), or LoRA through peft (lora). With adapters or LoRA the pretrained base stays frozen: a checkpoint
holds the weights that train and the base's identity (its path and `base_hash`), not the base.

- adapters: `adapter_attn_dim` (`adapter_dim`) in the model's config gives each pre-norm transformer layer
  (`Wav2Vec2EncoderLayerStableLayerNorm`, XLS-R's and MMS's) HF's `Wav2Vec2AttnAdapterLayer`;
  `init_adapter_layers` starts them and a new CTC head, as transformers' run_speech_recognition_ctc_adapter.py
  does. The adapters and the head train.
- lora: peft's LoRA (`inject_adapter_in_model`: the network keeps its class and its encoder pass) on the
  `target_modules`, rank `rank`, scale `alpha` / `rank`, dropout `dropout`. The LoRA matrices and the head train.
"""

import copy
import hashlib

import torch

from asr import SetupError

METHODS = {"full": set(), "adapters": {"adapter_dim"}, "lora": {"rank", "alpha", "dropout", "target_modules"}}
# What each number may be: (kind, least, below), a value v with least <= v (< below, where given).
NUMBERS = {"adapter_dim": (int, 1, None), "rank": (int, 1, None), "alpha": (float, 0, None),
           "dropout": (float, 0, 1)}


def check(finetune: dict) -> dict:
    """`finetune` with its method known and the settings it needs given: SetupError naming what is wrong."""
    method = finetune.get("method")
    if method not in METHODS:
        raise SetupError(f"model.finetune.method={method!r}: give one of {', '.join(METHODS)} (finetune=<method>)")
    given = set(finetune) - {"method"}
    if missing := METHODS[method] - given:
        raise SetupError(f"finetune={method} needs model.finetune.{', model.finetune.'.join(sorted(missing))}")
    if unknown := given - METHODS[method]:
        raise SetupError(f"finetune={method} does not take model.finetune.{', model.finetune.'.join(sorted(unknown))} "
                         f"(its settings: {', '.join(sorted(METHODS[method])) or 'none'})")
    for key in sorted(given & set(NUMBERS)):
        kind, least, below = NUMBERS[key]
        value = finetune[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (kind is int and not isinstance(value, int)) or value < least or (below and value >= below):
            wanted = (f"a whole number of at least {least}" if kind is int
                      else f"a number from {least} to below {below}" if below else f"a number above {least}")
            raise SetupError(f"model.finetune.{key}={value!r}: give {wanted}")
    if "target_modules" in given and not (isinstance(finetune["target_modules"], list) and finetune["target_modules"]
                                          and all(isinstance(m, str) for m in finetune["target_modules"])):
        raise SetupError(f"model.finetune.target_modules={finetune['target_modules']!r}: give a list of module "
                         f"names, e.g. [q_proj, v_proj]")
    return finetune


def config_overrides(finetune: dict) -> dict:
    """The Wav2Vec2Config fields a method sets: adapters, `adapter_attn_dim`."""
    return {"adapter_attn_dim": finetune["adapter_dim"]} if finetune["method"] == "adapters" else {}


def is_adapter_layer(name: str) -> bool:
    return ".adapter_layer." in f".{name}"


ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm",
                "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "layer_norm_eps")


def base_hash(network: torch.nn.Module) -> str:
    """sha256 of the base: its architecture (the config's `ARCHITECTURE` fields) and the bytes
    of every weight outside the CTC head and the adapters, by name. The same base gives the same hash however
    it was loaded; a base whose file changed does not."""
    config = network.config.to_dict()
    digest = hashlib.sha256(repr([(key, config.get(key)) for key in ARCHITECTURE]).encode())
    for name, tensor in sorted(network.state_dict().items()):
        if name.startswith("lm_head.") or is_adapter_layer(name) or "lora_" in name:
            continue
        digest.update(name.replace(".base_layer.", ".").encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def prepare(network: torch.nn.Module, finetune: dict, source: str) -> None:
    """Freezes the base of `network` (a SyncFreeWav2Vec2ForCTC built with `config_overrides`) and makes what
    `finetune` trains: the adapters (started by `init_adapter_layers`) or peft's LoRA layers, and the CTC
    head. `source`, the base's name, for the errors. full: nothing changes."""
    method = finetune["method"]
    if method == "full":
        return
    layers = network.wav2vec2.encoder.layers
    if method == "adapters" and not all(getattr(layer, "adapter_layer", None) is not None for layer in layers):
        raise SetupError(f"finetune=adapters: {source} has no transformer layers in the MMS form (pre-norm "
                         f"layers, do_stable_layer_norm=true, as XLS-R and MMS): its {type(layers[0]).__name__} takes "
                         f"no attention adapter; use finetune=lora or finetune=full")
    network.requires_grad_(False)
    if method == "adapters":
        network.init_adapter_layers()  # the adapters and a new CTC head, as HF's MMS adapter recipe
        for name, parameter in network.named_parameters():
            parameter.requires_grad_(is_adapter_layer(name))
    else:
        from peft import inject_adapter_in_model

        try:
            inject_adapter_in_model(lora_config(finetune), network)  # LoRA weights trainable, the rest frozen
        except ValueError as error:  # target modules that the network lacks
            raise SetupError(f"finetune=lora on {source}: {error}") from error
    network.lm_head.requires_grad_(True)


def lora_config(finetune: dict, **extra):
    from peft import LoraConfig

    return LoraConfig(r=finetune["rank"], lora_alpha=finetune["alpha"], lora_dropout=finetune["dropout"],
                      target_modules=list(finetune["target_modules"]), **extra)


def trainable_names(network: torch.nn.Module) -> set[str]:
    return {name for name, p in network.named_parameters() if p.requires_grad}


def without_lora(network: torch.nn.Module, merge: bool) -> torch.nn.Module:
    """A copy of `network` with each LoRA layer replaced by its base layer, the LoRA product added into the
    base weight first when `merge` (peft's merge_and_unload, on the network peft injected into)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    network = copy.deepcopy(network)
    for name, module in list(network.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge:
                module.merge()
            parent, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent), child, module.get_base_layer())
    network.__dict__.pop("peft_config", None)
    return network


def lora_files(network: torch.nn.Module, finetune: dict, base: str, out_dir) -> None:
    """peft's adapter files of a LoRA-trained `network` (adapter_config.json, adapter_model.safetensors) in
    `out_dir`: `PeftModel.from_pretrained(<base with this head>, out_dir)` gives the network back. The CTC head
    goes with them (peft's `modules_to_save`)."""
    from peft import get_peft_model

    plain = without_lora(network, merge=False)
    plain.config._name_or_path = base
    wrapped = get_peft_model(plain, lora_config(finetune, modules_to_save=["lm_head"]))
    lora = {name: tensor for name, tensor in network.state_dict().items() if "lora_" in name}
    missing = wrapped.base_model.model.load_state_dict(lora, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    # the head is in modules_to_save; peft's embedding-layer guess (a vocabulary other than the base's) would
    # look for token embeddings, which wav2vec2 has none of
    wrapped.save_pretrained(str(out_dir), save_embedding_layers=False)

"""
How our tensors map onto Hugging Face's Llama and GPT-2 layouts: shared by export.py's --format=hf and gguf
writers and lora.py's peft adapters, so an adapter names the same modules as the export of its base.
"""


def hf_layout(cfg):
    """The Hugging Face architecture our --format=hf export writes a model of this config as, or None."""
    if (cfg.norm, cfg.pos_embedding, cfg.mlp) == ('rmsnorm', 'rope', 'swiglu'):
        return 'llama'
    if (cfg.norm, cfg.pos_embedding, cfg.mlp) == ('layernorm', 'learned', 'gelu') and cfg.n_kv_head == cfg.n_head:
        return 'gpt2'
    return None


# Hugging Face's modules for the Linears of a block: Llama splits our fused ones, GPT-2 fuses them as we do
HF_PROJECTIONS = {
    'llama': {'attention.wqkv': ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'),
              'attention.wo': ('self_attn.o_proj',), 'feed_forward.w1': ('mlp.gate_proj', 'mlp.up_proj'),
              'feed_forward.w2': ('mlp.down_proj',)},
    'gpt2': {'attention.wqkv': ('attn.c_attn',), 'attention.wo': ('attn.c_proj',), 'feed_forward.w1': ('mlp.c_fc',),
             'feed_forward.w2': ('mlp.c_proj',)}}


def hf_projections(cfg, layout, module, rows):
    """{Hugging Face module: its rows} of a tensor whose rows are the outputs of the block Linear module (e.g.
    'attention.wqkv'): its weight, its bias or a LoRA B alike. Llama's q, k, v and gate, up are row slices."""
    names = HF_PROJECTIONS[layout][module]
    if len(names) == 3:
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        return dict(zip(names, rows.split([q, kv, kv])))
    return dict(zip(names, rows.chunk(len(names))))


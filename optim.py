"""
The optimizers train.py builds for a GPT: AdamW, or Muon for the matrices inside the blocks with AdamW for the rest.
"""
import torch


def orthogonalize(g, steps=5):
    """The nearest semi-orthogonal matrix to g, roughly: a quintic Newton-Schulz iteration tuned to push every
    singular value into [0.7, 1.2] in few steps (Muon, K. Jordan et al. 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    if g.size(0) > g.size(1):
        x = x.t()
    for _ in range(steps):
        s = x @ x.t()
        x = a * x + (b * s + c * s @ s) @ x
    return x.t() if g.size(0) > g.size(1) else x


class Muon(torch.optim.Optimizer):
    """Muon for groups with muon=True, AdamW for the others, in one optimizer (one state to checkpoint).

    Muon steps along the orthogonalised Nesterov momentum: every direction of a weight matrix moves at the same
    rate, which reaches a given loss in fewer steps than AdamW for the hidden matrices of a transformer. The
    embeddings, the head and the norms stay on AdamW."""

    def __init__(self, params, lr, betas=(0.9, 0.95), momentum=0.95, eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0,
                                      muon=False, lr_scale=1.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2) = group['lr'] * group['lr_scale'], group['betas']
            for p in group['params']:
                if p.grad is None:
                    continue
                state, grad = self.state[p], p.grad
                p.mul_(1 - lr * group['weight_decay'])
                if group['muon']:
                    if 'momentum_buffer' not in state:  # setdefault would build a zero buffer every step
                        state['momentum_buffer'] = torch.zeros_like(p)
                    buf = state['momentum_buffer']
                    buf.mul_(group['momentum']).add_(grad)
                    update = orthogonalize(grad.add(buf, alpha=group['momentum']))
                    p.add_(update, alpha=-lr * max(1, p.size(0) / p.size(1)) ** 0.5)  # tall: rows are shorter
                    continue
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state['step'] += 1
                state['exp_avg'].lerp_(grad, 1 - beta1)
                state['exp_avg_sq'].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state['exp_avg_sq'] / (1 - beta2 ** state['step'])).sqrt_().add_(group['eps'])
                p.addcdiv_(state['exp_avg'], denom, value=-lr / (1 - beta1 ** state['step']))



def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, muon_lr=None):
    """AdamW; or, with muon_lr, Muon at muon_lr for the matrices inside the blocks and AdamW for the rest."""
    # decay matrices (matmul weights, embeddings), never norms or biases
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    matrices = [p for p in params.values() if p.dim() >= 2]
    vectors = [p for p in params.values() if p.dim() < 2]
    if muon_lr is None:
        return torch.optim.AdamW([{'params': matrices, 'weight_decay': weight_decay},
                                  {'params': vectors, 'weight_decay': 0.0}],
                                 lr=learning_rate, betas=betas, fused=device_type == 'cuda')
    hidden = [p for n, p in params.items() if p.dim() == 2 and n.startswith('layers.')]
    embeddings = [p for p in matrices if all(p is not h for h in hidden)]
    # the schedule sets every group's lr; Muon's groups scale it by lr_scale
    return Muon([{'params': hidden, 'muon': True, 'lr_scale': muon_lr / learning_rate},
                 {'params': embeddings, 'weight_decay': weight_decay}, {'params': vectors}],
                lr=learning_rate, betas=betas)

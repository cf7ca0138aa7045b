"""Self-distillation in the sparse stage (train.py --loss distill | lm+distill): the model in sparse mode (the
student) learns the next-token distribution of the frozen dense model the stage starts from (the teacher).

For every position i of the batch, with the final hidden states (after the last norm) h_i of the student and
g_i of the teacher, their lm_head weights W_s and W_t, the temperature T and the vocabulary v:

    s_i = W_s h_i,   t_i = W_t g_i                                  student and teacher logits
    p_i = softmax(t_i / T),   q_i = softmax(s_i / T)
    distill_kl = T^2 * mean_i sum_v p_i[v] * (log p_i[v] - log q_i[v])      KL(teacher || student)
    lm_loss    = mean over {i : y_i != -100} of -log softmax(s_i)[y_i],  y_i = labels[i + 1]

The T^2 factor (Hinton et al., 2015) keeps the gradient's scale independent of T: d KL / d s_i scales as 1/T.
lm_loss is the model's own loss (transformers' causal-LM loss: shifted labels, -100 ignored, mean over the
rest), computed from the same logits.

Memory: a vocabulary of 152K makes one L x V fp32 logit tensor 2.5 GB at L = 4096. The positions are taken
`chunk_size` at a time, and each chunk's logits and losses are computed inside torch.utils.checkpoint: only the
chunk's hidden states are kept for backward, where its logits are recomputed, so at most one chunk's
student and teacher logits exist at once.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label of a position without LM loss (transformers' ignore_index)


def chunk_sums(hidden, head, teacher_hidden, teacher_head, targets, temperature):
    """(sum over the chunk's positions of KL(p_i || q_i) at temperature T, without T^2; sum of their LM losses)
    for hidden (N, D), targets (N,): the summands of `distill_losses`."""
    logits = (hidden @ head.T).float()  # N, V
    log_q = F.log_softmax(logits / temperature, dim=-1)
    log_p = F.log_softmax((teacher_hidden @ teacher_head.T).float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    lm = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return kl, lm


def distill_losses(
    hidden: torch.Tensor,  # B, L, D: the student's final hidden states
    head: torch.Tensor,  # V, D: the student's lm_head weight
    teacher_hidden: torch.Tensor,  # B, L, D (no grad)
    teacher_head: torch.Tensor,  # V, D (no grad)
    labels: torch.Tensor,  # B, L: the model's labels (unshifted; -100 = no LM loss)
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distill_kl, lm_loss) of the module docstring, `chunk_size` positions at a time."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()  # y_i = labels[i + 1]; none after the last
    hidden, teacher_hidden = hidden.flatten(0, 1), teacher_hidden.flatten(0, 1)
    kl, lm = 0.0, 0.0
    for start in range(0, len(targets), chunk_size):
        rows = slice(start, start + chunk_size)
        kl_c, lm_c = checkpoint(chunk_sums, hidden[rows], head, teacher_hidden[rows], teacher_head, targets[rows],
                                temperature, use_reentrant=False)
        kl, lm = kl + kl_c, lm + lm_c
    return temperature**2 * kl / len(targets), lm / (targets != IGNORE).sum()

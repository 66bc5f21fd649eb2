"""OpenRLHF's Actor.forward (OpenRLHF/OpenRLHF 3c3be62, openrlhf/models/actor.py) and the
helpers it calls, transcribed for the tests (OpenRLHF needs flash-attn, DeepSpeed and Ray, so
it is not installed here): the text-model path, packed samples without a ring attention group
(flash_attn.bert_padding's unpad_input / pad_input reduced to index operations), and
openrlhf/models/utils.py's log_probs_from_logits fallback (no flash-attn) and compute_entropy.
The tests patch an instance of this class and compare the two forwards.

Found while transcribing: with temperature != 1 and return_entropy, OpenRLHF's in-place division
of the logits (``logits.div_(temperature)``) modifies the tensor the entropy's graph saved, so a
loss with an entropy term (``entropy_coef`` != 0) fails in backward ("modified by an inplace
operation"); ``inplace_division=False`` divides a copy, giving the intended gradients as the
reference for prefkern's patch (which has no such failure)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unpad_and_slice_tensor(sequences, attention_mask, ring_attn_group):
    assert ring_attn_group is None
    rolled_sequences = torch.roll(sequences, shifts=-1, dims=1)
    indices = attention_mask.flatten().nonzero().flatten()
    position_ids = torch.clip(torch.cumsum(attention_mask, dim=-1) - 1, min=0, max=None)
    pick = lambda t: t.flatten()[indices][None]  # noqa: E731  (1, total tokens)
    return pick(sequences), pick(position_ids), pick(rolled_sequences), 0, indices


def gather_and_pad_tensor(tensor, ring_attn_group, ring_attn_pad_len, indices, batch, seqlen):
    assert ring_attn_group is None and ring_attn_pad_len == 0
    out = tensor.new_zeros(batch * seqlen)
    return out.index_put((indices,), tensor[0]).view(batch, seqlen)


def log_probs_from_logits(logits, labels, temperature=1.0, inplace=True):
    if temperature != 1.0:  # OpenRLHF divides in place (inplace=False: a copy, for the tests)
        logits = logits.div_(temperature) if inplace else logits / temperature
    if logits.dtype in [torch.float32, torch.float64]:
        batch_dim = logits.shape[:-1]
        last_dim = logits.shape[-1]
        logits_labels = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
        logsumexp_values = torch.logsumexp(logits.reshape(-1, last_dim), dim=-1)
        return logits_labels - logsumexp_values.view(*batch_dim)
    rows = [F.log_softmax(r, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            for r, y in zip(logits, labels, strict=True)]
    return torch.stack(rows)


def compute_entropy(logits):
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


class Actor(torch.nn.Module):
    def __init__(self, model, temperature=1.0, packing_samples=False, inplace_division=True):
        super().__init__()
        self.inplace_division = inplace_division
        self.model = model
        self.temperature = temperature
        self.packing_samples = packing_samples

    def forward(self, sequences, action_mask=None, attention_mask=None, return_output=False,
                allgather_logits=False, return_logprobs=False, ring_attn_group=None,
                packed_seq_lens=None, return_entropy=False, **mm_inputs):
        batch, seqlen = sequences.size()
        if self.packing_samples:
            sequences, position_ids, rolled_sequences, ring_attn_pad_len, indices = \
                unpad_and_slice_tensor(sequences, attention_mask, ring_attn_group)
            foward_attention_mask = None
        else:
            rolled_sequences = torch.roll(sequences, shifts=-1, dims=1)
            foward_attention_mask = attention_mask
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
        output = self.model(sequences, attention_mask=foward_attention_mask,
                            position_ids=position_ids, **mm_inputs)
        output["logits"] = output["logits"].to(torch.float32)
        if return_entropy:
            assert return_output
            entropy = compute_entropy(output["logits"])
            if self.packing_samples:
                entropy = gather_and_pad_tensor(entropy, ring_attn_group, ring_attn_pad_len,
                                                indices, batch, seqlen)
            output.entropy = entropy[:, :-1]
        return_action_log_probs = action_mask is not None
        if not return_action_log_probs and not return_logprobs:
            assert return_output
            return output
        log_probs = log_probs_from_logits(output["logits"], rolled_sequences,
                                          temperature=self.temperature,
                                          inplace=self.inplace_division)
        if self.packing_samples:
            log_probs = gather_and_pad_tensor(log_probs, ring_attn_group, ring_attn_pad_len,
                                              indices, batch, seqlen)
        log_probs = log_probs[:, :-1]
        if not return_action_log_probs and return_logprobs:
            return (log_probs, output) if return_output else log_probs
        action_log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
        return (action_log_probs, output) if return_output else action_log_probs

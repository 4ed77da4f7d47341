"""One OGEN training step the way the paper's code runs it, for the benchmark baseline.

Per step, OGEN's public trainer (``trainers/ogen.py``, ``forward_backward``) runs the image
encoder on the batch, the text encoder once for the base prompts and once more for the new
prompts, the generator; after the warm-up it then runs the whole model a second time only to
read two target tensors, and back-propagates through the first pass. ``paper_ogen_step``
reproduces that work with our modules (prompt learners built with ``trim=False``: CoOp's
prompt learner runs all context-length positions); vlood_fast's step (``vlood_ogen_step``)
encodes the images once for the whole run (cached features) and gets base and new text from
one forward that stops after the last end-of-text token.
"""
import torch
import torch.nn.functional as F


def paper_ogen_step(clip_model, images, labels, learner_base, learner_new, criterion, optimizer,
                    progress=1.0):
    def full_forward():
        with torch.no_grad():
            x = F.normalize(clip_model.encode_image(images).float(), dim=-1)
        return x, learner_base(), learner_new()

    x, text_base, text_new = full_forward()
    if progress >= criterion.warmup:
        full_forward()  # the redundant second pass: only its targets are read, they equal x
    loss, _ = criterion(x, labels, text_base, text_new, progress)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def vlood_ogen_step(features, labels, learner_all, num_base, criterion, optimizer, progress=1.0):
    text = learner_all()  # base and new classes in one text forward
    loss, _ = criterion(features, labels, text[:num_base], text[num_base:], progress)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()

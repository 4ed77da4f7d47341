"""Adding OGEN to a CoOp-style prompt-learning loop.

    python examples/ogen_prompt_learning.py

A CoOp loop learns context vectors with ``cross_entropy(100 * img @ prompt_learner().T, y)`` on
the base classes. OGEN adds (1) a feature generator that synthesizes image features for
unknown (new) classes from their names, trained with the base classes' statistics, and (2) a
local mean teacher that distills into the prompts. The lines marked "OGEN" are all you add.
"""
import torch

from vlood_fast import LocalMeanTeacher, OgenGenerator, OgenLoss
from vlood_fast.clip import PromptLearner, create_model
from vlood_fast.ogen import ClassStatistics

torch.manual_seed(0)
model, _, tokenizer = create_model("vlood-tiny")                  # your open_clip model
base = ["cat", "dog", "fox", "owl", "bee"]
new = ["cow", "elk", "yak"]                                        # names only, no images
dim = model.text_projection.shape[1]

# stand-in for your cached image features of the base classes: [N, D] normalized
labels = torch.arange(len(base)).repeat_interleave(8)
with torch.no_grad():
    anchors = PromptLearner(model, tokenizer, base)()
feats = torch.nn.functional.normalize(anchors[labels] + 0.3 * torch.randn(len(labels), dim), dim=1)

learner = PromptLearner(model, tokenizer, base + new)              # one forward: base and new
stats = ClassStatistics(len(base), dim).update(feats, labels)                    # OGEN
generator = OgenGenerator(dim, num_heads=4)                                       # OGEN
criterion = OgenLoss(generator, stats.mean, stats.std, warmup=0.2)               # OGEN
teacher = LocalMeanTeacher(learner, m_min=2, m_max=4)                             # OGEN
optimizer = torch.optim.SGD(list(learner.parameters()) + list(generator.parameters()), lr=0.002,
                            momentum=0.9)

epochs, steps = 5, 4
for epoch in range(epochs):
    teacher_text = teacher().detach() if teacher.snapshots else None             # OGEN
    for step in range(steps):
        idx = torch.randint(0, len(labels), (16,))
        text = learner()                                   # [len(base) + len(new), D]
        progress = (epoch + step / steps) / epochs
        # CoOp was: loss = F.cross_entropy(100 * feats[idx] @ text[:len(base)].T, labels[idx])
        loss, parts = criterion(feats[idx], labels[idx], text[:len(base)], text[len(base):],  # OGEN
                                progress=progress,
                                teacher_text_features=None if teacher_text is None else teacher_text[:len(base)],
                                teacher_new_text_features=None if teacher_text is None else teacher_text[len(base):])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.update(learner, progress=(epoch + 1) / epochs)                         # OGEN
    print(f"epoch {epoch}: loss {loss.item():.3f} ({', '.join(sorted(parts))})")

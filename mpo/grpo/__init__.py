"""GRPO, R1V2's second stage (arXiv 2504.16656), on TRL's ``GRPOTrainer``.

- :mod:`mpo.grpo.rewards`: the hybrid reward's components (rule, format, reward model), each callable
  the way TRL calls a reward function, and their weighted sum;
- :mod:`mpo.grpo.advantages`: group-normalised advantages as TRL computes them, and which groups
  carry no signal;
- :mod:`mpo.grpo.ssb`: the Selective Sample Buffer (replay into zero-signal groups, drawn in
  proportion to |advantage|) and the offline prompt filter.
- :mod:`mpo.grpo.rows`: a GRPOTrainer batch cut into rows and rows joined into a batch (what a
  buffered sample carries from the step that sampled it to the batch that replays it);
- :mod:`mpo.grpo.trainer`: ``MpoGRPOTrainer``, TRL's ``GRPOTrainer`` with the components' metrics and
  the buffer over the global batch (its state in every checkpoint);
- :mod:`mpo.grpo.run`: ``mpo grpo``'s run from a recipe (prompts, key, rewards, the offline filter,
  training, resume, ``policy/``).

Settings: :mod:`mpo.config.grpo` (the recipe's ``grpo`` section).
"""

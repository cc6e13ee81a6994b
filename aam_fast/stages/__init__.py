"""Training stages: thin trainers on the shared runtime (:mod:`aam_fast.training`); they never import each other."""

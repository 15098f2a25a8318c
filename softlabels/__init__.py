"""softlabels: offline knowledge distillation for language models.

The one import name this project claims. Its parts live in the repository's top-level folders
and are mapped here by pyproject.toml: `softlabels.data` (the format both sides share),
`softlabels.generate` (the teacher side), `softlabels.train_student` (the student side).
"""

__version__ = "0.5.0"

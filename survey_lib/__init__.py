"""survey_lib: a small library behind the compression-and-acceleration workbook."""

__version__ = "0.1.0"

from plateforme.python_backend.triton.embedding import TritonPythonModel  # noqa: F401

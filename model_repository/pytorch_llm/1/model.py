from plateforme.python_backend.triton.engine import TritonPythonModel  # noqa: F401

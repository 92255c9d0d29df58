from plateforme.python_backend.triton.preprocessing import TritonPythonModel  # noqa: F401

from plateforme.python_backend.triton.bls import TritonPythonModel  # noqa: F401

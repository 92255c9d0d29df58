from plateforme.python_backend.triton.postprocessing import TritonPythonModel  # noqa: F401

"""Lays out the python backend of nvidia-pytriton's tritonserver as Triton expects it.

pytriton keeps one stub per Python version apart from the backend, and Triton looks for the stub
inside the backend's directory (services/stack/servers.py does the same at run time).
Usage: python assemble.py BACKENDS_DIR ENV_FILE
"""
import shutil
import sys
import sysconfig
from pathlib import Path

import pytriton

backends, env_file = Path(sys.argv[1]), Path(sys.argv[2])
root = Path(pytriton.__file__).parent / "tritonserver"
version = f"{sys.version_info.major}.{sys.version_info.minor}"
target = backends / "python"
target.mkdir(parents=True, exist_ok=True)
for source in (
    root / "backends" / "python" / "libtriton_python.so",
    root / "backends" / "python" / "triton_python_backend_utils.py",
    root / "python_backend_stubs" / version / "triton_python_backend_stub",
):
    shutil.copy2(source, target / source.name)
libs = next((p for p in (root.parent.parent / "nvidia_pytriton.libs", root / "external_libs") if p.is_dir()), None)
libdirs = [sysconfig.get_config_var("LIBDIR")] + ([str(libs)] if libs else [])
env_file.write_text(
    f"TRITON_ROOT={root}\nTRITON_BACKENDS={backends}\nTRITON_LD_LIBRARY_PATH={':'.join(libdirs)}\n"
)
print(env_file.read_text())

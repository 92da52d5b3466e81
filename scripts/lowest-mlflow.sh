#!/usr/bin/env bash
# A virtual environment with the lowest MLflow the pin allows and everything else from the
# main one: MLflow's three packages at that version, the rest found through a site dir.
set -euo pipefail
main="$(cd "$1" && pwd)"; mkdir -p "$2"; lowest="$(cd "$2" && pwd)"; version="$3"
if [ ! -x "$lowest/bin/python" ]; then
  "$main/bin/python" -m venv --without-pip "$lowest"
fi
site="$("$lowest/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
main_site="$("$main/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# after the lowest env's own packages, the main env's (with its .pth files: the editable mlops)
echo "import site; site.addsitedir('$main_site')" > "$site/zz_main_env.pth"
if ! "$lowest/bin/python" -c "import mlflow, sys; sys.exit(mlflow.__version__ != '$version')" 2>/dev/null; then
  "$main/bin/python" -m pip install --quiet --no-deps --target "$site" --upgrade \
    "mlflow==$version" "mlflow-skinny==$version" "mlflow-tracing==$version"
fi
# console scripts the tests start by path run on this environment's Python
write_tool() {
  printf '#!%s\nimport sys\nfrom %s import %s as main\nsys.exit(main())\n' "$lowest/bin/python" "$2" "$3" > "$lowest/bin/$1"
  chmod +x "$lowest/bin/$1"
}
write_tool mlflow mlflow.cli cli
write_tool mlops mlops.cli main
write_tool uvicorn uvicorn.main main
write_tool moto_server moto.server main
# binary tools the main environment installed (actionlint)
for tool in actionlint; do
  if [ -x "$main/bin/$tool" ]; then ln -sf "$main/bin/$tool" "$lowest/bin/$tool"; fi
done
"$lowest/bin/python" -c "import mlflow, mlops; print('lowest-MLflow environment: mlflow', mlflow.__version__)"

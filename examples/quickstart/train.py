"""Quickstart job: a linear classifier on scikit-learn's bundled digits.

Needs no download (the data ships inside scikit-learn) and no GPU, so it runs
anywhere the bridge agent does. Each epoch prints one line (flushed, so
`bridge logs -f` shows it as it happens) and rewrites outputs/metrics.json, so
a reader pulling outputs mid-run sees the file grow. At the end it writes
outputs/model.pkl and logs an MLflow run into ./mlruns.

MLflow uses the plain file store in the default experiment (id 0): every run is
a directory named by a random run id under mlruns/0/, so the mlruns/ of many
jobs merge into one local mlruns/ without conflicts. A named experiment would
get a different random id in each job and show up as duplicates.
"""

import argparse
import json
import os
import pathlib
import pickle

import mlflow
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

OUT = pathlib.Path("outputs")


def write_json(path: pathlib.Path, data) -> None:
    # Write beside and rename, so a sync never ships a half-written file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    seed = int(os.environ.get("SEED", "0"))

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    classes = np.unique(y)
    rng = np.random.default_rng(seed)

    model = SGDClassifier(
        loss="log_loss",
        learning_rate="constant",
        eta0=args.lr,
        alpha=1e-4,
        random_state=seed,
    )

    OUT.mkdir(exist_ok=True)
    mlflow.set_tracking_uri(pathlib.Path("mlruns").resolve().as_uri())
    history = []
    with mlflow.start_run(run_name="digits"):
        mlflow.log_params({"epochs": args.epochs, "lr": args.lr, "seed": seed})
        for epoch in range(1, args.epochs + 1):
            # One pass over the shuffled training set; loss and accuracy are
            # measured on the held-out quarter.
            order = rng.permutation(len(x_train))
            model.partial_fit(x_train[order], y_train[order], classes=classes)
            loss = log_loss(y_test, model.predict_proba(x_test), labels=classes)
            accuracy = accuracy_score(y_test, model.predict(x_test))
            history.append({"epoch": epoch, "loss": loss, "accuracy": accuracy})
            write_json(OUT / "metrics.json", history)
            mlflow.log_metrics({"loss": loss, "accuracy": accuracy}, step=epoch)
            print(
                f"epoch {epoch}/{args.epochs} loss={loss:.4f} accuracy={accuracy:.4f}",
                flush=True,
            )

        with open(OUT / "model.pkl", "wb") as f:
            pickle.dump({"scaler": scaler, "model": model}, f)
        mlflow.log_artifact(str(OUT / "model.pkl"))
        run_id = mlflow.active_run().info.run_id

    print(f"done: accuracy={history[-1]['accuracy']:.4f} mlflow run {run_id}", flush=True)


if __name__ == "__main__":
    main()

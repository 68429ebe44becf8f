// Klein LoRA Trainer: a live chart on the KleinLoRATrainer node.
//
// The trainer sends `klein.training` server events while it runs (nodes/trainer_node.py):
//   {node, kind: "step",       training_step, training_steps, loss, losses: [[training_step, loss], ...], s_per_step, eta_s}
//   {node, kind: "checkpoint", training_step, validation_loss, likeness}
//   {node, kind: "done",       verdict}
// This extension keeps them per node id and draws, in a small canvas widget under the node's inputs: the training
// loss (raw, faint) and its moving average, the fixed-noise validation loss per checkpoint, and a status line
// (training step / total, s/step, ETA, health verdict). The widget is never serialized: workflows and prompts are
// unchanged by it. Works with the ComfyUI frontends of 0.3.75 (1.32) and 0.33 (1.49).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "KleinLoRATrainer";
const EVENT = "klein.training";
const CHART_HEIGHT = 170;
const SMOOTHING = 0.9; // exponential moving average of the training loss (bias-corrected)
const COLORS = { raw: "rgba(120,160,220,0.35)", smooth: "#5fa8ff", validation: "#ffa640", text: "#ddd", dim: "#999", grid: "#444" };

/** Per-node training state, keyed by the node id as the server sends it (a string). */
const states = new Map();

function newState() {
    return { losses: [], smoothed: [], validation: [], total: 0, sPerStep: null, etaS: null, verdict: "", status: "waiting for training", ema: null, updates: 0, draws: 0 };
}

function stateFor(id) {
    const key = String(id);
    if (!states.has(key)) states.set(key, newState());
    return states.get(key);
}

function formatSeconds(seconds) {
    if (seconds == null || !isFinite(seconds)) return "?";
    const s = Math.round(seconds);
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

function onTrainingEvent(detail) {
    if (!detail || detail.node == null) return;
    let state = stateFor(detail.node);
    if (detail.kind === "step") {
        const last = state.losses.length ? state.losses[state.losses.length - 1][0] : 0;
        const first = detail.losses?.[0]?.[0] ?? detail.training_step;
        if (first <= last) { // a new run on this node
            states.set(String(detail.node), newState());
            state = stateFor(detail.node);
        }
        const step = detail.training_step;
        // The trainer reads the loss every few training steps (each read waits for the GPU) and sends every
        // training step's loss since the previous read.
        for (const [lossStep, value] of detail.losses ?? [[step, detail.loss]]) {
            const loss = Number(value);
            if (!isFinite(loss)) continue;
            state.losses.push([lossStep, loss]);
            state.ema = SMOOTHING * (state.ema ?? 0) + (1 - SMOOTHING) * loss;
            const correction = 1 - Math.pow(SMOOTHING, state.losses.length);
            state.smoothed.push([lossStep, state.ema / (correction || 1)]);
        }
        state.total = detail.training_steps;
        state.sPerStep = detail.s_per_step;
        state.etaS = detail.eta_s;
        state.status = `training step ${step}/${state.total} · ${Number(state.sPerStep ?? 0).toFixed(2)} s/step · ETA ${formatSeconds(state.etaS)}`;
    } else if (detail.kind === "checkpoint") {
        if (detail.validation_loss != null && isFinite(detail.validation_loss)) {
            state.validation.push([detail.training_step, Number(detail.validation_loss)]);
        }
    } else if (detail.kind === "done") {
        state.verdict = detail.verdict || "";
        state.status = `done: ${state.losses.length ? state.losses[state.losses.length - 1][0] : 0}/${state.total} training steps`;
    }
    state.updates += 1;
    const node = app.graph?.getNodeById?.(Number(detail.node)) ?? app.graph?.getNodeById?.(detail.node);
    node?.kleinChart?.redraw();
    app.graph?.setDirtyCanvas?.(true, false);
}

function drawLine(ctx, points, x0, y0, w, h, xMax, yMin, yMax, color, width, dots) {
    if (!points.length) return;
    const px = (step) => x0 + (xMax > 0 ? (step / xMax) * w : 0);
    const py = (value) => y0 + h - ((value - yMin) / (yMax - yMin || 1)) * h;
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    points.forEach(([step, value], i) => (i ? ctx.lineTo(px(step), py(value)) : ctx.moveTo(px(step), py(value))));
    ctx.stroke();
    if (dots) points.forEach(([step, value]) => { ctx.beginPath(); ctx.arc(px(step), py(value), 3, 0, 2 * Math.PI); ctx.fill(); });
}

function paint(canvas, state) {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(50, canvas.clientWidth);
    const height = Math.max(50, canvas.clientHeight);
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
        canvas.width = Math.round(width * ratio);
        canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.fillStyle = "rgba(0,0,0,0.25)";
    ctx.fillRect(0, 0, width, height);
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "top";
    ctx.fillStyle = COLORS.text;
    ctx.fillText(state.status, 6, 4, width - 12);
    const verdict = state.verdict ? state.verdict.split("\n")[0] : "";
    if (verdict) {
        ctx.fillStyle = /^healthy/i.test(verdict) ? "#7bd88f" : "#ff6b6b"; // "Healthy: ..." or "Collapse detected: ..."
        ctx.fillText(verdict, 6, 18, width - 12);
    }
    const plot = { x: 34, y: verdict ? 34 : 20, w: width - 42, h: height - (verdict ? 34 : 20) - 18 };
    const values = [...state.losses, ...state.validation].map((p) => p[1]);
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    ctx.strokeRect(plot.x, plot.y, plot.w, plot.h);
    if (values.length && plot.h > 10) {
        let yMin = Math.min(...values), yMax = Math.max(...values);
        if (yMax - yMin < 1e-6) { yMin -= 0.05; yMax += 0.05; }
        const xMax = Math.max(state.total || 0, ...state.losses.map((p) => p[0]), ...state.validation.map((p) => p[0]), 1);
        drawLine(ctx, state.losses, plot.x, plot.y, plot.w, plot.h, xMax, yMin, yMax, COLORS.raw, 1, false);
        drawLine(ctx, state.smoothed, plot.x, plot.y, plot.w, plot.h, xMax, yMin, yMax, COLORS.smooth, 2, false);
        drawLine(ctx, state.validation, plot.x, plot.y, plot.w, plot.h, xMax, yMin, yMax, COLORS.validation, 1.5, true);
        ctx.fillStyle = COLORS.dim;
        ctx.fillText(yMax.toPrecision(3), 2, plot.y, 30);
        ctx.fillText(yMin.toPrecision(3), 2, plot.y + plot.h - 10, 30);
        ctx.fillText(`${xMax}`, plot.x + plot.w - 30, plot.y + plot.h + 3, 30);
    }
    ctx.fillStyle = COLORS.smooth;
    ctx.fillText("— loss (smoothed)", plot.x, height - 14);
    ctx.fillStyle = COLORS.validation;
    ctx.fillText("● validation loss", plot.x + 110, height - 14);
    state.draws += 1;
}

function addChart(node) {
    const canvas = document.createElement("canvas");
    canvas.style.width = "100%";
    canvas.style.height = `${CHART_HEIGHT}px`;
    canvas.className = "klein-training-chart";
    const widget = node.addDOMWidget("klein_training_chart", "klein_chart", canvas, {
        serialize: false, // never part of the workflow's widgets_values nor of the prompt
        hideOnZoom: false,
        getMinHeight: () => CHART_HEIGHT,
        getMaxHeight: () => CHART_HEIGHT,
        getValue: () => "",
        setValue: () => {},
    });
    widget.serialize = false;
    node.kleinChart = {
        canvas,
        widget,
        state: () => stateFor(node.id),
        redraw: () => paint(canvas, stateFor(node.id)),
    };
    if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => node.kleinChart.redraw()).observe(canvas);
    requestAnimationFrame(() => node.kleinChart.redraw());
}

app.registerExtension({
    name: "KleinLoRA.TrainingChart",
    setup() {
        api.addEventListener(EVENT, (event) => onTrainingEvent(event.detail));
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== NODE_TYPE) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            addChart(this);
            return result;
        };
    },
});

// For tests and debugging: the per-node training state the chart draws.
window.KleinTrainingCharts = states;

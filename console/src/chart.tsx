// A time-series chart (uPlot, canvas) with a text summary for screen readers.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { useEffect, useRef } from "preact/hooks";

export interface Series {
  label: string;
  values: number[];
  color: string;
  unit: string;
}

export function Chart(props: { title: string; x: number[]; series: Series[]; hourly: boolean }) {
  const box = useRef<HTMLDivElement>(null);
  useEffect(() => {
    const el = box.current!;
    const width = () => Math.max(280, el.clientWidth);
    const plot = new uPlot(
      {
        width: width(),
        height: 240,
        scales: { x: { time: true } },
        axes: [{}, { size: 70 }],
        series: [{}, ...props.series.map((s) => ({ label: `${s.label} (${s.unit})`, stroke: s.color, width: 2, fill: `${s.color}22`, points: { show: props.x.length < 40 } }))],
      },
      [props.x, ...props.series.map((s) => s.values)],
      el,
    );
    const ro = new ResizeObserver(() => plot.setSize({ width: width(), height: 240 }));
    ro.observe(el);
    return () => {
      ro.disconnect();
      plot.destroy();
    };
  }, [props.x, props.series, props.hourly]);
  const totals = props.series.map((s) => `${s.label}: ${s.values.reduce((a, b) => a + b, 0).toLocaleString()} ${s.unit}`).join("; ");
  return (
    <figure class="chart">
      <div ref={box} role="img" aria-label={`${props.title}. Totals: ${totals}`} />
      <figcaption class="muted">{props.title}</figcaption>
    </figure>
  );
}

//! Plots of a search, drawn from its output directory alone (`history.jsonl`, `space.json`),
//! as PNG and SVG under `OUT_DIR/plots/`:
//!
//! * `fitness.{png,svg}` — dev fitness against evaluations: every evaluation as a grey dot,
//!   each generation's spread (worst to best) as a bar, and the best so far as a line;
//! * `coefficients.{png,svg}` (PS) — heatmap of the best genome's decoded values: one column
//!   per layer group, one row per parameter × model (× attention / MLP part); colour = position
//!   in the parameter's range, the value written in the cell;
//! * `route.{png,svg}` (DFS) — the best route: one box per hop in the row of its model, with
//!   the layer it runs and the scale applied to its input.
//!
//! Text is rendered with the DejaVu Sans font embedded in the binary (the `dejavu` crate,
//! registered once with plotters' `ab_glyph` backend), so no system font is needed.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::candidate::Route;
use crate::error::{Error, Result};
use crate::search::history::{self, Record};
use crate::search::space::{Part, SpaceFile, reflect};
use crate::store::writer::temp_path;

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TTF shipped by the `dejavu` crate; failure is impossible in
        // practice and would only make text invisible, so it is not fatal.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

fn perr<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Msg(format!("drawing {what}: {e:?}"))
}

/// Rename a plot drawn into `tmp` to `path`; when drawing failed (`drawn`), or the rename
/// does, remove `tmp`.
fn into_place(drawn: Result<()>, tmp: &Path, path: &Path) -> Result<()> {
    let renamed = drawn.and_then(|()| std::fs::rename(tmp, path).map_err(|e| Error::io(path, e)));
    if renamed.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    renamed
}

/// Redraw every plot of the search in `out_dir`; returns the files written. Each file is
/// replaced atomically (drawn under a temporary name, then renamed).
pub fn plot(out_dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    register_font();
    let records = history::load(out_dir)?;
    let dir = out_dir.join("plots");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let space_path = out_dir.join("space.json");
    let space: Option<SpaceFile> = std::fs::read_to_string(&space_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut written = Vec::new();
    let mut both = |name: &str,
                    draw: &dyn Fn(DrawingArea<BitMapBackend, Shift>) -> Result<()>,
                    draw_svg: &dyn Fn(DrawingArea<SVGBackend, Shift>) -> Result<()>,
                    size: (u32, u32)|
     -> Result<()> {
        // Each drawn under a temporary name (the extension kept, which picks the encoder)
        // and renamed into place, so a kill never leaves a half-written plot.
        let png = dir.join(format!("{name}.png"));
        let tmp = temp_path(&png);
        let drawn = draw(BitMapBackend::new(&tmp, size).into_drawing_area());
        into_place(drawn, &tmp, &png)?;
        let svg = dir.join(format!("{name}.svg"));
        let tmp = temp_path(&svg);
        let drawn = draw_svg(SVGBackend::new(&tmp, size).into_drawing_area());
        into_place(drawn, &tmp, &svg)?;
        written.push(png);
        written.push(svg);
        Ok(())
    };
    both(
        "fitness",
        &|a| fitness(a, &records),
        &|a| fitness(a, &records),
        (900, 560),
    )?;
    let best = history::best(&records);
    match (&space, best) {
        (
            Some(SpaceFile::Ps {
                groups,
                genes,
                models,
            }),
            Some(best),
        ) => {
            let cells = heat_cells(groups.len(), genes, models, best);
            let cols: Vec<String> = groups.iter().map(|g| g.label()).collect();
            let h = 140 + 34 * cells.rows.len() as u32;
            let w = (260 + 62 * cols.len() as u32).max(520);
            both(
                "coefficients",
                &|a| heatmap(a, &cols, &cells),
                &|a| heatmap(a, &cols, &cells),
                (w, h),
            )?;
        }
        (Some(SpaceFile::Dfs { models, .. }), Some(best)) => {
            let route: Route = serde_json::from_str(&best.recipe).map_err(|e| {
                Error::Search(format!("the best record's route is not readable: {e}"))
            })?;
            let w = (200 + 64 * route.hops.len() as u32).max(520);
            let h = 150 + 70 * models.len() as u32;
            both(
                "route",
                &|a| route_plot(a, models, &route),
                &|a| route_plot(a, models, &route),
                (w, h),
            )?;
        }
        _ => {}
    }
    Ok(written)
}

fn fitness<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, records: &[Record]) -> Result<()> {
    let e = perr("the fitness plot");
    root.fill(&WHITE).map_err(&e)?;
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.generation, r.index));
    let points: Vec<(f64, f64)> = sorted
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.fitness.map(|f| ((i + 1) as f64, f)))
        .collect();
    let failures = sorted.len() - points.len();
    let (mut lo, mut hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| {
            (l.min(p.1), h.max(p.1))
        });
    if !lo.is_finite() {
        lo = 0.0;
        hi = 1.0;
    }
    let pad = ((hi - lo) * 0.08).max(1e-3 * hi.abs().max(1.0));
    let (lo, hi) = (lo - pad, hi + pad);
    let n = sorted.len().max(1) as f64;
    let caption = if failures > 0 {
        format!("Dev fitness ({failures} failed evaluations not shown)")
    } else {
        "Dev fitness".to_string()
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n + 1.0, lo..hi)
        .map_err(&e)?;
    chart
        .configure_mesh()
        .x_desc("evaluations")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("fitness (higher is better)")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(&e)?;

    // each generation's spread
    let mut start = 0usize;
    let spread_color = RGBColor(120, 160, 220);
    while start < sorted.len() {
        let g = sorted[start].generation;
        let end = start
            + sorted[start..]
                .iter()
                .take_while(|r| r.generation == g)
                .count();
        let vals: Vec<f64> = sorted[start..end]
            .iter()
            .filter_map(|r| r.fitness)
            .collect();
        if !vals.is_empty() {
            let x = (start + end + 1) as f64 / 2.0;
            let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, lo), (x, hi)],
                    spread_color.stroke_width(6),
                )))
                .map_err(&e)?;
        }
        start = end;
    }
    chart
        .draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, 2, RGBColor(90, 90, 90).filled())),
        )
        .map_err(&e)?
        .label("evaluation")
        .legend(|(x, y)| Circle::new((x + 10, y), 3, RGBColor(90, 90, 90).filled()));
    chart
        .draw_series(std::iter::once(PathElement::new(
            Vec::<(f64, f64)>::new(),
            spread_color.stroke_width(6),
        )))
        .map_err(&e)?
        .label("generation spread")
        .legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], spread_color.stroke_width(6))
        });
    let mut best = f64::NEG_INFINITY;
    let mut line = Vec::new();
    for &(x, f) in &points {
        if f > best {
            if let Some(&(_, prev)) = line.last() {
                line.push((x, prev));
            }
            best = f;
        }
        line.push((x, best));
    }
    let red = RGBColor(200, 40, 40);
    chart
        .draw_series(LineSeries::new(line, red.stroke_width(3)))
        .map_err(&e)?
        .label("best so far")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red.stroke_width(3)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

/// A heatmap row: its label and, per column, (position in range, value).
type HeatRow = (String, Vec<Option<(f64, f64)>>);

/// Heatmap rows.
struct Cells {
    rows: Vec<HeatRow>,
}

fn heat_cells(
    n_groups: usize,
    genes: &[crate::search::space::PsGene],
    models: &[String],
    best: &Record,
) -> Cells {
    let mut rows: Vec<HeatRow> = Vec::new();
    for (gene, &g) in genes.iter().zip(&best.genome) {
        let who = gene
            .model
            .map(|m| {
                models
                    .get(m)
                    .cloned()
                    .unwrap_or_else(|| format!("model {m}"))
            })
            .unwrap_or_else(|| "global".into());
        let label = match gene.part {
            Part::All => format!("{} · {who}", gene.param),
            p => format!("{} · {who} · {}", gene.param, p.label()),
        };
        let idx = match rows.iter().position(|(l, _)| *l == label) {
            Some(i) => i,
            None => {
                rows.push((label, vec![None; n_groups]));
                rows.len() - 1
            }
        };
        if gene.group < n_groups {
            rows[idx].1[gene.group] = Some((reflect(g), gene.decode(g)));
        }
    }
    Cells { rows }
}

/// Light yellow → dark blue.
fn ramp(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let a = (255.0, 247.0, 188.0);
    let m = (65.0, 182.0, 196.0);
    let b = (37.0, 52.0, 148.0);
    let (p, q, s) = if t < 0.5 {
        (a, m, t * 2.0)
    } else {
        (m, b, t * 2.0 - 1.0)
    };
    let mix = |x: f64, y: f64| (x + (y - x) * s).round() as u8;
    RGBColor(mix(p.0, q.0), mix(p.1, q.1), mix(p.2, q.2))
}

fn heatmap<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    cols: &[String],
    cells: &Cells,
) -> Result<()> {
    let e = perr("the coefficient heatmap");
    root.fill(&WHITE).map_err(&e)?;
    let (w, _) = root.dim_in_pixel();
    let title = TextStyle::from((FONT, 20).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    root.draw(&Text::new(
        "Best genome: merge parameters per layer group",
        (w as i32 / 2, 12),
        title,
    ))
    .map_err(&e)?;
    let left = 220i32;
    let top = 70i32;
    let cw = 62i32;
    let ch = 34i32;
    let head = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (j, c) in cols.iter().enumerate() {
        root.draw(&Text::new(
            c.clone(),
            (left + cw * j as i32 + cw / 2, top - 6),
            head.clone(),
        ))
        .map_err(&e)?;
    }
    let label = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
    for (i, (name, vals)) in cells.rows.iter().enumerate() {
        let y = top + ch * i as i32;
        root.draw(&Text::new(
            name.clone(),
            (left - 10, y + ch / 2),
            label.clone(),
        ))
        .map_err(&e)?;
        for (j, v) in vals.iter().enumerate() {
            let x = left + cw * j as i32;
            let (fill, text) = match v {
                Some((t, v)) => (ramp(*t), Some((*t, *v))),
                None => (RGBColor(240, 240, 240), None),
            };
            root.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], fill.filled()))
                .map_err(&e)?;
            root.draw(&Rectangle::new(
                [(x, y), (x + cw, y + ch)],
                WHITE.stroke_width(2),
            ))
            .map_err(&e)?;
            if let Some((t, v)) = text {
                let color = if t > 0.55 { WHITE } else { BLACK };
                let style = TextStyle::from((FONT, 13).into_font())
                    .color(&color)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                root.draw(&Text::new(
                    format!("{v:.2}"),
                    (x + cw / 2, y + ch / 2),
                    style,
                ))
                .map_err(&e)?;
            }
        }
    }
    let y = top + ch * cells.rows.len() as i32 + 26;
    let note = TextStyle::from((FONT, 13).into_font()).color(&RGBColor(90, 90, 90));
    root.draw(&Text::new(
        "colour: position within the parameter's search range (light = min, dark = max)",
        (left - 200, y),
        note,
    ))
    .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

const MODEL_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn route_plot<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    models: &[String],
    route: &Route,
) -> Result<()> {
    let e = perr("the route plot");
    root.fill(&WHITE).map_err(&e)?;
    let (w, _) = root.dim_in_pixel();
    let title = TextStyle::from((FONT, 20).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    root.draw(&Text::new(
        format!(
            "Best route: {} hops (box: layer run; below: input scale)",
            route.hops.len()
        ),
        (w as i32 / 2, 12),
        title,
    ))
    .map_err(&e)?;
    let left = 170i32;
    let top = 60i32;
    let cw = 64i32;
    let rh = 70i32;
    let label = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
    for (m, name) in models.iter().enumerate() {
        let y = top + rh * m as i32 + rh / 2;
        root.draw(&Text::new(name.clone(), (left - 12, y), label.clone()))
            .map_err(&e)?;
        root.draw(&PathElement::new(
            vec![(left, y), (left + cw * route.hops.len() as i32, y)],
            RGBColor(225, 225, 225).stroke_width(1),
        ))
        .map_err(&e)?;
    }
    let center = |k: usize, m: usize| (left + cw * k as i32 + cw / 2, top + rh * m as i32 + rh / 2);
    let path: Vec<(i32, i32)> = route
        .hops
        .iter()
        .enumerate()
        .map(|(k, h)| center(k, h.model))
        .collect();
    root.draw(&PathElement::new(
        path,
        RGBColor(150, 150, 150).stroke_width(2),
    ))
    .map_err(&e)?;
    for (k, hop) in route.hops.iter().enumerate() {
        let (x, y) = center(k, hop.model);
        let color = MODEL_COLORS[hop.model % MODEL_COLORS.len()];
        root.draw(&Rectangle::new(
            [(x - 24, y - 16), (x + 24, y + 16)],
            color.filled(),
        ))
        .map_err(&e)?;
        let style = TextStyle::from((FONT, 14).into_font())
            .color(&WHITE)
            .pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new(format!("L{}", hop.layer), (x, y), style))
            .map_err(&e)?;
        let scale = TextStyle::from((FONT, 12).into_font())
            .color(&RGBColor(70, 70, 70))
            .pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Rectangle::new(
            [(x - 22, y + 18), (x + 22, y + 33)],
            WHITE.filled(),
        ))
        .map_err(&e)?;
        root.draw(&Text::new(format!("×{:.2}", hop.scale), (x, y + 19), scale))
            .map_err(&e)?;
    }
    let axis = TextStyle::from((FONT, 13).into_font())
        .color(&RGBColor(90, 90, 90))
        .pos(Pos::new(HPos::Center, VPos::Top));
    let y = top + rh * models.len() as i32 + 8;
    for k in 0..route.hops.len() {
        root.draw(&Text::new(
            format!("{k}"),
            (center(k, 0).0, y),
            axis.clone(),
        ))
        .map_err(&e)?;
    }
    root.draw(&Text::new(
        "hop",
        (left + cw * route.hops.len() as i32 / 2, y + 20),
        axis,
    ))
    .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

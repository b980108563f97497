fn main() {
    println!("evomerge");
}
